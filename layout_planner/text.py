"""The rule for text a caller may send: one function serves the planner and the HTTP API.

A prompt the API accepts must never fail later in the planner (a carriage return used to get
202 and then ``invalid_prompt``), so both call :func:`validate_text`; the API checks every
other string of a request (phrases, captions, negative prompts) with :func:`bad_character`.
"""

from __future__ import annotations

import unicodedata

from layout_planner.errors import InvalidPrompt

ALLOWED_CONTROLS = frozenset("\t\n")


def bad_character(text: str) -> str | None:
    """What is wrong with ``text``, or None: a control character other than tab and newline
    (a carriage return included), or a lone surrogate (it cannot even be stored as UTF-8)."""
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cs":
            return f"a lone surrogate (U+{ord(char):04X}) at position {index}"
        if category == "Cc" and char not in ALLOWED_CONTROLS:
            return (f"the control character U+{ord(char):04X} at position {index}; "
                    "only tabs and newlines are allowed")
    return None


def validate_text(text: str, what: str, max_chars: int, limit_name: str | None = None) -> str:
    """``text`` stripped; ``InvalidPrompt`` when it is not a string, empty, too long or holds a bad character.

    ``limit_name`` (a setting's name, say) is quoted in the too-long message.
    """
    if not isinstance(text, str):
        raise InvalidPrompt(f"the {what} must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise InvalidPrompt(f"the {what} is empty")
    if len(stripped) > max_chars:
        named = f" ({limit_name})" if limit_name else ""
        raise InvalidPrompt(f"the {what} has {len(stripped)} characters; the limit is {max_chars}{named}")
    problem = bad_character(stripped)
    if problem is not None:
        raise InvalidPrompt(f"the {what} contains {problem}")
    return stripped
