"""Typed errors of the planner: every failure names its cause (docs/method.md §1.5)."""

from __future__ import annotations


class PlannerError(Exception):
    """Base class of every error the planner raises on purpose."""


class InvalidPrompt(PlannerError, ValueError):
    """The caller's prompt or instruction cannot be sent (empty, too long, control characters)."""


class LLMUnavailable(PlannerError):
    """The endpoint could not be reached or kept failing (connection, timeout, 429, 5xx, 4xx)."""

    def __init__(self, message: str, attempts: int = 0):
        super().__init__(message)
        self.attempts = attempts


class LocalModelUnavailable(LLMUnavailable):
    """The local planner's model cannot be found, downloaded or loaded (a missing directory, offline)."""


class PlanCanceled(PlannerError):
    """The caller's ``should_cancel`` said stop; ``tokens`` counts the answer's tokens generated until then."""

    def __init__(self, message: str, tokens: int = 0):
        super().__init__(message)
        self.tokens = tokens


class LLMBadOutput(PlannerError):
    """The endpoint answered, but never with a layout we could parse."""

    def __init__(self, message: str, asks: int = 0, last_text: str | None = None):
        super().__init__(message)
        self.asks = asks
        self.last_text = last_text


class LayoutParseError(LLMBadOutput):
    """One answer is not a layout; the message says why (it is sent back to the LLM on a re-ask)."""

