"""Small English word helpers: singular nouns and the head noun of a phrase.

Used by the repair step (``"two chairs"`` -> ``"a chair"``, docs/method.md §1.4) and by the
benchmark rules to decide which object a box names. Rules, not a dictionary: they are
right for ordinary count nouns and a short list of irregular plurals.
"""

from __future__ import annotations

import re

_IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "wolves": "wolf",
    "leaves": "leaf", "shelves": "shelf", "loaves": "loaf", "oxen": "ox", "sheep": "sheep",
    "fish": "fish", "deer": "deer", "scissors": "scissors", "series": "series",
}  # fmt: skip
_UNCHANGED_ENDINGS = ("ss", "us", "is")

# Counts a phrase may start with ("two red chairs"); digits 2-20 count too.
NUMBER_WORDS = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}  # fmt: skip

# Words after which a noun phrase's modifiers begin ("a dog with a red collar" -> head "dog").
_PHRASE_BREAKS = {
    "with", "on", "in", "of", "at", "near", "next", "beside", "behind", "under", "over", "above", "below",
    "holding", "wearing", "carrying", "sitting", "standing", "lying", "parked", "placed", "made", "filled",
    "covered", "to", "from", "by", "that", "which", "who", "for", "against", "inside", "outside", "between",
}  # fmt: skip

# Participles that start a trailing clause ("a dog sleeping on a rug" -> head "dog") when they
# follow the noun: at word 3 or later, and followed by a break word or nothing. "a running dog"
# and "a reading lamp" keep their head.
_PARTICIPLES = {
    "sleeping", "running", "playing", "eating", "drinking", "looking", "jumping", "walking", "flying",
    "swimming", "resting", "leaning", "hanging", "perched", "floating", "driving", "reading", "waiting",
    "parked", "lying", "sitting", "standing", "placed", "stacked", "hidden", "peeking", "curled",
}  # fmt: skip

COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
)  # fmt: skip


def singular(word: str) -> str:
    """The singular of an English count noun (``cups`` -> ``cup``, ``boxes`` -> ``box``, ``mice`` -> ``mouse``)."""
    lower = word.lower()
    if lower in _IRREGULAR:
        return _IRREGULAR[lower]
    if len(lower) <= 3 or lower.endswith(_UNCHANGED_ENDINGS) or not lower.endswith("s"):
        return lower
    if lower.endswith("ies") and len(lower) > 4:
        return lower[:-3] + "y"
    if lower.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        return lower[:-2]
    return lower[:-1]


def words_of(phrase: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", phrase.lower())


def _noun_phrase(words: list[str]) -> list[str]:
    """The words up to the head noun: cut at the first preposition or trailing participle clause."""
    for index, word in enumerate(words):
        if index > 0 and word in _PHRASE_BREAKS:
            return words[:index]
        follows = words[index + 1] if index + 1 < len(words) else None
        if index > 1 and word in _PARTICIPLES and (follows is None or follows in _PHRASE_BREAKS):
            return words[:index]
    return words


def head_noun(phrase: str) -> str:
    """The noun a phrase names, singular: the last word before any trailing modifier clause.

    ``"a red backpack"`` -> ``backpack``; ``"a dog with a red collar"`` -> ``dog``;
    ``"a photo of a cat"`` would give ``photo`` (the phrase names a photo), which is why
    detector queries should be plain noun phrases.
    """
    words = _noun_phrase(words_of(phrase))
    return singular(words[-1]) if words else ""


def modifiers(phrase: str) -> list[str]:
    """The words before the head noun (articles, numbers, adjectives)."""
    return _noun_phrase(words_of(phrase))[:-1]


def singular_phrase(noun_phrase: str) -> str:
    """``"red chairs"`` -> ``"a red chair"``, ``"cups of tea"`` -> ``"a cup of tea"``: one instance, with an article."""
    tokens = noun_phrase.split()
    head = len(tokens) - 1
    for index, token in enumerate(tokens):
        if index > 0 and token.lower() in _PHRASE_BREAKS:
            head = index - 1
            break
    if tokens:
        word = tokens[head]
        stripped = word.rstrip(",.;:")
        tokens[head] = singular(stripped) + word[len(stripped) :]
    rest = " ".join(tokens)
    article = "an" if rest[:1].lower() in "aeiou" else "a"
    return f"{article} {rest}"


def count_in_phrase(phrase: str) -> tuple[int, str] | None:
    """``("two red chairs")`` -> ``(2, "red chairs")``; None when the phrase carries no count above one."""
    match = re.match(r"^\s*(\w+)\s+(.+)$", phrase)
    if not match:
        return None
    word, rest = match.group(1).lower(), match.group(2)
    count = NUMBER_WORDS.get(word) or (int(word) if word.isdigit() and 2 <= int(word) <= 20 else None)
    return (count, rest) if count else None
