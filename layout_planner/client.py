"""A client for any OpenAI-compatible endpoint, with bounded, counted retries (docs/method.md §1.2, §1.5).

The ``openai`` package does the HTTP (its own retries are off: ``max_retries=0``); tenacity
retries connection errors, timeouts, 429 (honouring ``Retry-After``, capped) and 5xx with
exponential backoff and jitter, at most ``max_attempts`` times. Every request carries
``timeout_s``, so one call lasts at most about ``max_attempts x (timeout_s + backoff)``.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

import openai
from pydantic import BaseModel, ConfigDict, Field
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from layout_planner.errors import LLMUnavailable, PlanCanceled
from layout_planner.template import COMPLETION_STOP, LAYOUT_JSON_SCHEMA, completion_prompt


class LLMConfig(BaseModel):
    """Where and how to ask the LLM. ``max_reasks`` counts asks per layout (the first included)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key: str | None = Field(None, repr=False)
    mode: Literal["chat", "completions"] = "chat"
    structured_output: Literal["auto", "json_schema", "off"] = "auto"
    temperature: float = Field(0.25, ge=0.0, le=2.0)
    max_tokens: int = Field(900, ge=16)
    timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(4, ge=1, le=10)
    max_reasks: int = Field(3, ge=1, le=10)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(30.0, ge=0, description="cap of one exponential backoff wait")
    max_retry_after_s: float = Field(60.0, ge=0, description="cap on a server's Retry-After")
    max_prompt_chars: int = Field(2000, ge=1)
    deadline_s: float | None = Field(
        None, gt=0, description="bound on one plan/revise call, all attempts, waits and re-asks together; None: none"
    )


@dataclass
class CallRecord:
    """What one ``complete`` call did: transport attempts, the waits between them (seconds), tokens generated (local)."""

    attempts: int = 0
    waits: list[float] = field(default_factory=list)
    structured: bool = False
    tokens: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    record: CallRecord


class _MalformedResponse(Exception):
    """The endpoint answered 200 with a body that is not a completion."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError | _MalformedResponse | openai.APIResponseValidationError):
        return True  # APITimeoutError is an APIConnectionError
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds a 429/503 response asks us to wait (``retry-after-ms``, ``Retry-After`` seconds or date)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    if headers.get("retry-after-ms"):
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


# Hosted endpoints that refuse every request without a key: fail at once instead of retrying a 401.
KEYED_HOSTS = ("api.openai.com",)


def needs_api_key(config: LLMConfig) -> bool:
    """Whether ``config`` points at a hosted endpoint that needs a key and has none."""
    return not config.api_key and (urlparse(config.base_url).hostname or "") in KEYED_HOSTS


_STATUS_HINTS = {
    401: " (check the API key)",
    403: " (check the API key's permissions)",
    404: " (check the model name, and that the base URL is the API root, usually ending in /v1)",
}


class LLMClient:
    """Sends one conversation and returns the answer's text; remembers whether json_schema works.

    ``on_retry`` (optional) is told, in one line, each transport failure that will be retried
    and the wait before the next attempt, so that a CLI can show why nothing happens yet.
    """

    def __init__(self, config: LLMConfig, on_retry: Callable[[str], None] | None = None):
        self.config = config
        self.on_retry = on_retry
        self._openai = openai.OpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "unused",  # local servers need no key; the client insists on one
            timeout=config.timeout_s,
            max_retries=0,
        )
        self._structured_ok: bool | None = None if config.structured_output == "auto" else config.structured_output == "json_schema"
        self._token_param = "max_tokens"  # "max_completion_tokens" once the endpoint asks for it
        self._send_temperature = True  # False once the endpoint refuses a temperature
        self._backoff = wait_exponential_jitter(
            initial=config.backoff_s, max=config.max_backoff_s, exp_base=2, jitter=config.backoff_s
        )

    def check_reachable(self, timeout_s: float = 10.0) -> None:
        """One request, no retries, before any work (a CLI's): ``GET {base_url}/models``, where any
        HTTP answer, even an error status, means the endpoint is there. An endpoint that cannot be
        connected to is ``LLMUnavailable`` at once, in one line, instead of after every attempt of
        a planning call (which the service keeps, for an endpoint that is restarting)."""
        if needs_api_key(self.config):
            raise LLMUnavailable(f"LLM endpoint {self.config.base_url} needs an API key and none is configured", attempts=0)
        try:
            self._openai.with_options(timeout=min(self.config.timeout_s, timeout_s)).models.list()
        except openai.APIConnectionError as exc:  # APITimeoutError included
            raise LLMUnavailable(self._describe(exc, 1), attempts=1) from exc
        except openai.APIError:
            return  # it answered (404, 401, an unexpected body...): reachable

    def wait_s(self, retry_state: RetryCallState) -> float:
        """The wait before the next attempt: the server's Retry-After (capped) if it sent one, else backoff."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after_s(exc) if exc is not None else None
        if asked is not None:
            return min(asked, self.config.max_retry_after_s)
        return self._backoff(retry_state)

    def complete(
        self, messages: list[dict[str, str]], should_cancel: Callable[[], bool] | None = None, seed: int = 0,
        deadline: float | None = None,
    ) -> Completion:
        """Ask once (with transport retries); raise ``LLMUnavailable`` naming the last cause.

        ``should_cancel`` is checked before each attempt (a request in flight runs to its end);
        ``seed`` is for the local client's sampling and unused here.
        
        ``deadline`` (a ``time.monotonic()`` value) bounds the whole call: each request's timeout
        and each wait are cut to what is left, and no attempt starts after it (``LLMUnavailable``).
        """
        record = CallRecord()

        def left_s() -> float:
            return float("inf") if deadline is None else deadline - time.monotonic()

        def sleep(seconds: float) -> None:  # a wait that a cancel or the deadline cuts short
            end = time.monotonic() + min(seconds, max(0.0, left_s()))
            while (remaining := end - time.monotonic()) > 0:
                if should_cancel is not None and should_cancel():
                    return
                time.sleep(min(remaining, 0.25))

        def note_wait(state: RetryCallState) -> None:
            wait = state.next_action.sleep if state.next_action else 0.0
            record.waits.append(wait)
            if self.on_retry is not None and state.outcome is not None:
                cause = self._cause(state.outcome.exception())
                self.on_retry(f"{cause}; attempt {state.attempt_number} of {self.config.max_attempts}, next in {wait:.1f} s")

        if needs_api_key(self.config):
            raise LLMUnavailable(f"LLM endpoint {self.config.base_url} needs an API key and none is configured", attempts=0)

        retrying = Retrying(
            stop=stop_after_attempt(self.config.max_attempts),
            wait=self.wait_s,
            retry=retry_if_exception(_is_transient),
            before_sleep=note_wait,
            sleep=sleep,
            reraise=True,
        )

        def attempt() -> Completion:
            if should_cancel is not None and should_cancel():
                raise PlanCanceled("planning canceled before the LLM answered")
            if left_s() <= 0:
                raise LLMUnavailable(f"LLM endpoint {self.config.base_url} (model {self.config.model}): the planning "
                                     f"deadline of {self.config.deadline_s:g} s passed after {record.attempts} "
                                     "attempt(s)", attempts=record.attempts)
            record.attempts += 1
            return self._request(messages, record, timeout=min(self.config.timeout_s, left_s()))

        try:
            return retrying(attempt)
        except (openai.APIError, _MalformedResponse) as exc:
            raise LLMUnavailable(self._describe(exc, record.attempts), attempts=record.attempts) from exc

    def _cause(self, exc: BaseException | None) -> str:
        """A few words on one failed attempt."""
        if isinstance(exc, openai.APITimeoutError):
            return f"no answer within {self.config.timeout_s:g} s"
        if isinstance(exc, openai.APIConnectionError):
            return f"cannot connect ({exc.__cause__ or exc})"
        if isinstance(exc, openai.APIStatusError):
            return f"HTTP {exc.status_code}"
        return f"malformed response ({exc})"

    def _describe(self, exc: BaseException, attempts: int) -> str:
        where = f"{self.config.base_url} (model {self.config.model})"
        tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        if isinstance(exc, openai.APITimeoutError):
            return f"LLM endpoint {where} timed out ({self.config.timeout_s:g} s per request) {tries}"
        if isinstance(exc, openai.APIConnectionError):
            return f"cannot reach LLM endpoint {where} {tries}: {exc.__cause__ or exc}"
        if isinstance(exc, openai.APIStatusError):
            body = exc.body.get("message") if isinstance(exc.body, dict) else None
            detail = " ".join(str(body or exc.message).split())[:200]
            if exc.status_code == 429:
                return f"LLM endpoint {where} is rate limiting (429) {tries}: {detail}"
            if exc.status_code >= 500:
                return f"LLM endpoint {where} failed with HTTP {exc.status_code} {tries}: {detail}"
            hint = _STATUS_HINTS.get(exc.status_code, "")
            return f"LLM endpoint {where} refused the request with HTTP {exc.status_code}: {detail}{hint}"
        return f"LLM endpoint {where} sent a malformed response {tries}: {exc}"

    def _request(self, messages: list[dict[str, str]], record: CallRecord, timeout: float) -> Completion:
        try:
            return self._send(messages, record, timeout)
        except json.JSONDecodeError as exc:  # a 200 whose body is not JSON
            raise _MalformedResponse(f"the body is not JSON ({exc.msg})") from exc

    def _send(self, messages: list[dict[str, str]], record: CallRecord, timeout: float) -> Completion:
        cfg = self.config
        if cfg.mode == "completions":
            response = self._openai.completions.create(
                model=cfg.model,
                prompt=completion_prompt(messages),
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
                stop=COMPLETION_STOP,
                timeout=timeout,
            )
            choice = self._first_choice(response)
            return Completion(text=getattr(choice, "text", None) or "", finish_reason=choice.finish_reason, record=record)
        kwargs: dict = {"model": cfg.model, "messages": messages, self._token_param: cfg.max_tokens, "timeout": timeout}
        if self._send_temperature:
            kwargs["temperature"] = cfg.temperature
        if self._structured_ok is not False:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "layout", "schema": LAYOUT_JSON_SCHEMA, "strict": True},
            }
        for _ in range(4):  # at most one adaptation per option, then the request stands or fails
            try:
                response = self._openai.chat.completions.create(**kwargs)
                break
            except openai.BadRequestError as exc:
                if not self._adapt(exc, kwargs):
                    raise
        else:
            response = self._openai.chat.completions.create(**kwargs)
        if "response_format" in kwargs and cfg.structured_output == "auto":
            self._structured_ok = True
        record.structured = "response_format" in kwargs
        choice = self._first_choice(response)
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None) or ""
        return Completion(text=text, finish_reason=choice.finish_reason, record=record)

    def _adapt(self, exc: openai.BadRequestError, kwargs: dict) -> bool:
        """Change ``kwargs`` after a 400 that names an option this endpoint does not take; remember it.

        Reasoning models (OpenAI o-series, gpt-5) want ``max_completion_tokens`` instead of
        ``max_tokens`` and only their default temperature; many local servers reject
        ``response_format``. Returns False when the 400 is none of these.
        """
        message = " ".join(str(exc.body.get("message") if isinstance(exc.body, dict) else exc.message).split()).lower()
        if "max_tokens" in kwargs and "max_completion_tokens" in message:
            self._token_param = "max_completion_tokens"
            kwargs["max_completion_tokens"] = kwargs.pop("max_tokens")
            return True
        if "temperature" in kwargs and "temperature" in message:
            self._send_temperature = False  # sampling falls back to the model's default
            del kwargs["temperature"]
            return True
        if "response_format" in kwargs and self.config.structured_output == "auto":
            self._structured_ok = False  # plain text from now on
            del kwargs["response_format"]
            return True
        return False


    @staticmethod
    def _first_choice(response: object):
        choices = getattr(response, "choices", None)
        if not choices:
            raise _MalformedResponse(f"no choices in the response body {str(response)[:120]!r}")
        return choices[0]

    def close(self) -> None:
        self._openai.close()
