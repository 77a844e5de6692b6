"""Prompts of the per-box and final passes and where each phrase's tokens sit in them
(docs/method.md §2.3, §2.6). CLIP's tokenizer splits on words first, so the tokens of
``prefix + " " + text`` are the tokens of ``prefix`` followed by those of ``text``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from layout_planner.layout import Layout

_ARTICLES = {"a", "an", "one", "the"}
_COUNTS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


@dataclass(frozen=True)
class PhraseGroup:
    """Identical phrases of several objects, written once with a count ("two apples")."""

    phrase: str
    object_ids: tuple[str, ...]
    text: str
    count_word: str


def _plural(noun_phrase: str) -> str:
    """Naive English plural of the phrase's last word (good for the usual "red apple" phrases)."""
    words = noun_phrase.split()
    last = words[-1]
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(words[:-1] + [last])


def group_phrases(layout: Layout) -> list[PhraseGroup]:
    """Objects with the same phrase (case-insensitive) in first-appearance order."""
    order: list[str] = []
    members: dict[str, list[str]] = {}
    first_text: dict[str, str] = {}
    for obj in layout.objects:
        key = obj.phrase.strip().lower()
        if key not in members:
            order.append(key)
            members[key] = []
            first_text[key] = obj.phrase.strip()
        members[key].append(obj.id)
    groups = []
    for key in order:
        phrase, ids = first_text[key], tuple(members[key])
        if len(ids) == 1:
            groups.append(PhraseGroup(phrase, ids, phrase, ""))
            continue
        words = phrase.split()
        bare = " ".join(words[1:]) if len(words) > 1 and words[0].lower() in _ARTICLES else phrase
        count = _COUNTS.get(len(ids), str(len(ids)))
        groups.append(PhraseGroup(phrase, ids, _plural(bare), count))
    return groups


def object_prompt(background: str, phrase: str) -> str:
    """The per-box prompt (§2.3)."""
    return f"{background} with {phrase}"


def scene_prompt(background: str, groups: list[PhraseGroup]) -> str:
    """The final and baseline prompt (§2.6): ``"{background} with a, b and two cs"``."""
    parts = [f"{g.count_word} {g.text}".strip() for g in groups]
    if not parts:
        return background
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{background} with {listed}"


def join_negative(*parts: str | None) -> str:
    return ", ".join(p.strip() for p in parts if p and p.strip())


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0


def token_indices(tokenizer, prefix: str, text: str) -> tuple[int, ...]:
    """Positions of ``text``'s tokens in the encoded ``prefix + " " + text`` (after BOS),
    dropping those past the tokenizer's length limit."""
    start = 1 + _n_tokens(tokenizer, prefix)
    count = _n_tokens(tokenizer, text)
    limit = tokenizer.model_max_length - 1
    return tuple(i for i in range(start, start + count) if i < limit)


def object_token_indices(tokenizer, background: str, phrase: str) -> tuple[int, ...]:
    return token_indices(tokenizer, f"{background} with", phrase)


def scene_token_indices(
    tokenizer, background: str, groups: list[PhraseGroup], *, count_words: bool = False
) -> dict[str, tuple[int, ...]]:
    """Group phrase -> its token positions in :func:`scene_prompt`; with ``count_words`` a
    group's count word ("two" of "two apples") is one of them, as in the reference."""
    result: dict[str, tuple[int, ...]] = {}
    prefix = f"{background} with"
    for index, group in enumerate(groups):
        if index > 0:
            prefix += " and" if index == len(groups) - 1 else ","
        text = group.text
        if group.count_word and count_words:
            text = f"{group.count_word} {group.text}"
        elif group.count_word:
            prefix += f" {group.count_word}"
        result[group.phrase] = token_indices(tokenizer, prefix, text)
        prefix += f" {text}"
    return result


def object_phrase_span(background: str, phrase: str) -> tuple[int, int]:
    """Characters of ``phrase`` in :func:`object_prompt` (for connectors that map characters to tokens)."""
    start = len(object_prompt(background, ""))
    return start, start + len(phrase)


def scene_phrase_spans(background: str, groups: list[PhraseGroup]) -> dict[str, tuple[int, int]]:
    """Group phrase -> the characters of its text in :func:`scene_prompt` (count words excluded),
    found by building the prompt piece by piece, never by searching (phrases may repeat)."""
    spans: dict[str, tuple[int, int]] = {}
    position = len(f"{background} with ")
    for index, group in enumerate(groups):
        if index > 0:
            position += len(" and ") if index == len(groups) - 1 else len(", ")
        start = position + (len(group.count_word) + 1 if group.count_word else 0)
        spans[group.phrase] = (start, start + len(group.text))
        position += len(f"{group.count_word} {group.text}".strip())
    return spans
