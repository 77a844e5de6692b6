"""Readers for the syntax real LLMs wrap around a layout (docs/method.md §1.3).

Models answer with code fences (```json, ```python, ```), chatter before and after, a
reasoning preamble (``<think>...</think>``), trailing commas and ``//`` comments in JSON,
Python-style single quotes, and, when cut at ``max_tokens``, half a layout. These helpers
find the layout inside such text. They never evaluate anything: ``json`` and
``ast.literal_eval`` only, and a regular expression for tuples that are not valid literals.
"""

from __future__ import annotations

import ast
import json
import re

from layout_planner.errors import LayoutParseError

_REASONING_TAGS = ("think", "thinking", "reasoning")
_REASONING_BLOCK = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)```", re.DOTALL)
_FENCE_LINE = re.compile(r"^[ \t]*```[A-Za-z0-9_+-]*[ \t]*$", re.MULTILINE)

# ('a phrase', [x, y, w, h]) even when the phrase's quotes are not valid Python ('a child's toy').
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
TUPLE = re.compile(
    r"[(\[]\s*(?P<q>['\"])(?P<phrase>[^\[\]\n]+?)(?P=q)\s*,\s*[\[(]\s*(?P<box>"
    + _NUMBER + r"(?:\s*,\s*" + _NUMBER + r"){3})\s*,?\s*[\])]\s*[)\]]",
)  # fmt: skip
# What may sit between tuples of a list: separators, list brackets, bullets ("1.", "-").
_BETWEEN_TUPLES = re.compile(r"^(?:[\s,\[\]]|(?<![^\s\[,])(?:\d{1,2}[.)]|[-*•]))*$")


def strip_reasoning(text: str) -> str:
    """The answer without a reasoning model's ``<think>...</think>`` preamble.

    Some servers drop the opening tag: everything up to the last closing tag is reasoning.
    A block that never closes means the model was cut while thinking: there is no answer.
    """
    text = _REASONING_BLOCK.sub("", text)
    lower = text.lower()
    for tag in _REASONING_TAGS:
        closing = lower.rfind(f"</{tag}>")
        if closing >= 0:
            text, lower = text[closing + len(tag) + 3 :], lower[closing + len(tag) + 3 :]
        if f"<{tag}>" in lower:
            raise LayoutParseError(f"the answer is only reasoning: <{tag}> is never closed (cut at max_tokens?)")
    return text.strip()


def fenced_blocks(text: str) -> list[str]:
    """The contents of the answer's code fences, in order."""
    return [block.strip() for block in _FENCE.findall(text)]


def without_fence_lines(text: str) -> str:
    """The text with the fence marker lines removed (the reference text format inside ``` fences)."""
    return _FENCE_LINE.sub("", text)


def bracket_spans(text: str, openers: str = "{[") -> list[tuple[int, int]]:
    """Top-level bracketed spans ``(start, end)``; ``end`` is -1 for a span the text never closes.

    Quote-aware for double quotes (JSON) and, outside prose, single quotes (Python literals):
    a single quote only opens a string right after a bracket, a comma, a colon or a space
    inside a bracket, so "here's" in the chatter does not confuse it.
    """
    spans: list[tuple[int, int]] = []
    depth, start, quote, index = 0, -1, "", 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 2
                continue
            if char == quote:
                quote = ""
        elif depth and char == '"':
            quote = char
        elif depth and char == "'" and text[index - 1] in "[{(,: \n\t":
            quote = char
        elif char in "[{(" and (depth or char in openers):
            if depth == 0:
                start = index
            depth += 1
        elif char in "]})" and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, index + 1))
        index += 1
    if depth:
        spans.append((start, -1))
    return spans


def _outside_strings(text: str):
    """Yield ``(index, char, in_string)`` over JSON text (double-quoted strings with escapes)."""
    in_string, escaped = False, False
    for index, char in enumerate(text):
        if in_string:
            yield index, char, True
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        else:
            if char == '"':
                in_string = True
            yield index, char, in_string


def without_json_noise(text: str) -> str:
    """JSON text without ``//`` and ``/* */`` comments and without trailing commas before ``]`` or ``}``."""
    out: list[str] = []
    skip_until = -1
    chars = list(_outside_strings(text))
    for index, char, in_string in chars:
        if index < skip_until:
            continue
        if not in_string and text.startswith("//", index):
            newline = text.find("\n", index)
            skip_until = len(text) if newline < 0 else newline
            continue
        if not in_string and text.startswith("/*", index):
            close = text.find("*/", index + 2)
            skip_until = len(text) if close < 0 else close + 2
            continue
        if not in_string and char == ",":
            rest = text[index + 1 :].lstrip()
            while rest.startswith("//"):  # a comment between the comma and the bracket
                rest = rest[rest.find("\n") + 1 :].lstrip() if "\n" in rest else ""
            if rest[:1] in ("]", "}"):
                continue
        out.append(char)
    return "".join(out)


def load_json_like(text: str) -> object:
    """A JSON value, tolerating comments and trailing commas, else a Python literal (single quotes).

    Raises ``ValueError`` with the JSON error when none of these reads the text.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        first = exc
    try:
        return json.loads(without_json_noise(text))
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        pass
    raise ValueError(f"invalid JSON: {first.msg} at character {first.pos}")


def complete_json_objects(text: str, key: str = "objects") -> list[dict]:
    """The complete elements of the ``key`` array of a JSON text that stops mid-way (truncated answer)."""
    match = re.search(r'"' + re.escape(key) + r'"\s*:\s*\[', text)
    if not match:
        return []
    decoder = json.JSONDecoder()
    items, index = [], match.end()
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        try:
            value, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return items
        if isinstance(value, dict):
            items.append(value)


def json_string_field(text: str, key: str) -> str | None:
    """The value of a complete ``"key": "..."`` string field anywhere in (possibly truncated) JSON text."""
    match = re.search(r'"' + re.escape(key) + r'"\s*:\s*"((?:[^"\\]|\\.)*)"', text)
    if not match:
        return None
    try:
        return json.loads(f'"{match.group(1)}"')
    except json.JSONDecodeError:
        return None


def read_tuples(text: str, partial_tail: bool = False) -> list[tuple[str, list[float]]] | None:
    """``('phrase', [x, y, w, h])`` items read one by one, or None when the text holds more than such items.

    For lists that are no valid literal: an unescaped apostrophe ("'a child's toy'"), missing
    commas, numbered lines. Everything between the first and the last tuple must be
    separators, and nothing after the last may look like another item, so no text is lost
    (``partial_tail``: except an item cut off at the end of a truncated answer).
    """
    matches = list(TUPLE.finditer(text))
    if not matches:
        return None
    gaps = [text[a.end() : b.start()] for a, b in zip(matches, matches[1:])]
    if not all(_BETWEEN_TUPLES.match(gap) for gap in gaps):
        return None
    if not partial_tail and re.search(r"[(\[]", text[matches[-1].end() :]):
        return None
    return [(m.group("phrase"), [float(v) for v in re.findall(_NUMBER, m.group("box"))]) for m in matches]
