"""Parse an LLM answer into a layout, then validate and repair it (METHOD.md §1.3, §1.4).

Two steps, kept apart so that the benchmark can score answers exactly as the LLM gave them:

1. ``parse_answer(text) -> Answer``: the objects as written (phrase, [x, y, w, h] on the
   512 grid, the id if the format carries one), the background and the negative prompt.
   Accepts a JSON object (bare or in a fenced block) or the reference text format. Never
   ``eval``: ``json`` and ``ast.literal_eval`` only.
2. ``build_layout(answer, previous=None) -> Layout``: drops, clips and splits boxes, caps the
   object count, assigns ids (keeping ``previous``'s ids for objects that stayed, §1.7), and
   records every change as one warning line that starts with a stable tag (``dropped:``,
   ``clipped:``, ``split:``, ``count:``, ``capped:``, ``phrase:``, ``text:``, ``id:``).
"""

from __future__ import annotations

import ast
import json
import re

from pydantic import BaseModel, Field, ValidationError

from layout_planner.errors import LayoutParseError
from layout_planner.layout import (
    DEFAULT_BACKGROUND,
    GRID,
    MAX_OBJECTS,
    MAX_PHRASE_CHARS,
    Layout,
    LayoutObject,
    next_object_id,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from layout_planner.words import singular_phrase

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_BACKGROUND_LABEL = "Background prompt:"
_NEGATIVE_LABEL = "Negative prompt:"
_ID_OK = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")

NUMBER_WORDS = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}  # fmt: skip
# A count phrase is split only while every part keeps at least this many grid pixels along the split.
MIN_SPLIT_PX = 24
MAX_TEXT_CHARS = 1000  # Layout's limit on background and negative


class AnswerObject(BaseModel):
    """One object as the LLM wrote it: box ``[x, y, w, h]`` on the 512 grid, unvalidated."""

    id: str | None = None
    phrase: str
    box: tuple[float, float, float, float]


class Answer(BaseModel):
    """An LLM answer, parsed but not repaired."""

    objects: list[AnswerObject] = Field(default_factory=list)
    background: str = DEFAULT_BACKGROUND
    negative: str = ""
    has_ids: bool = False


# ----------------------------------------------------------------------------------------
# 1. Parsing
# ----------------------------------------------------------------------------------------


def parse_answer(text: str | None) -> Answer:
    """Parse JSON (bare or fenced) or the reference text format; raise ``LayoutParseError`` naming the problem."""
    if text is None or not text.strip():
        raise LayoutParseError("the answer is empty")
    text = text.strip()
    if _BACKGROUND_LABEL.lower() in text.lower() and not text.lstrip("`json \n").startswith("{"):
        return _parse_reference_text(text)
    fenced = _FENCE.search(text)
    candidate = fenced.group(1).strip() if fenced else text
    if "{" in candidate:
        return _parse_json(candidate)
    raise LayoutParseError(
        "the answer is neither a JSON object nor a list of ('phrase', [x, y, w, h]) followed by 'Background prompt:'"
    )


def _parse_json(text: str) -> Answer:
    start, end = text.find("{"), text.rfind("}")
    if end <= start:
        raise LayoutParseError("the JSON object is not closed (truncated answer?)")
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise LayoutParseError(f"invalid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(data, dict):
        raise LayoutParseError("the JSON answer must be an object with 'objects', 'background', 'negative'")
    objects = data.get("objects")
    if objects is None:
        raise LayoutParseError("the JSON answer has no 'objects' list")
    if not isinstance(objects, list):
        raise LayoutParseError("'objects' must be a list")
    parsed = []
    for index, item in enumerate(objects):
        if not isinstance(item, dict):
            raise LayoutParseError(f"objects[{index}] must be an object with 'phrase' and 'box'")
        phrase = item.get("phrase", item.get("name"))
        parsed.append(_answer_object(phrase, item.get("box"), item.get("id"), f"objects[{index}]"))
    background = data.get("background", DEFAULT_BACKGROUND)
    negative = data.get("negative", "")
    if not isinstance(background, str) or not isinstance(negative, str | None):
        raise LayoutParseError("'background' and 'negative' must be strings")
    return Answer(
        objects=parsed,
        background=background.strip() or DEFAULT_BACKGROUND,
        negative=_clean_negative(negative or ""),
        has_ids=any(o.id is not None for o in parsed),
    )


def _parse_reference_text(text: str) -> Answer:
    """``[('a cat', [x, y, w, h]), ...]`` then ``Background prompt: ...`` then optional ``Negative prompt: ...``."""
    lower = text.lower()
    if lower.count(_BACKGROUND_LABEL.lower()) > 1:
        raise LayoutParseError("the answer has more than one 'Background prompt:' line")
    cut = lower.index(_BACKGROUND_LABEL.lower())
    head, rest = text[:cut], text[cut + len(_BACKGROUND_LABEL) :]
    neg_at = rest.lower().find(_NEGATIVE_LABEL.lower())
    background, negative = (rest, "") if neg_at < 0 else (rest[:neg_at], rest[neg_at + len(_NEGATIVE_LABEL) :])
    if "objects:" in head.lower():
        head = head[head.lower().index("objects:") + len("objects:") :]
    head = head.strip()
    if not head or "no objects" in head.lower():
        items = []
    else:
        start, end = head.find("["), head.rfind("]")
        if start < 0 or end <= start:
            raise LayoutParseError("expected a list of ('phrase', [x, y, w, h]) before 'Background prompt:'")
        try:
            items = ast.literal_eval(head[start : end + 1])
        except (SyntaxError, ValueError) as exc:
            raise LayoutParseError(f"the object list is not a valid literal: {exc}") from None
        if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], str):
            items = [items]
        if not isinstance(items, list | tuple):
            raise LayoutParseError("expected a list of ('phrase', [x, y, w, h]) before 'Background prompt:'")
    parsed = []
    for index, item in enumerate(items):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise LayoutParseError(f"item {index} must be ('phrase', [x, y, w, h]), got {item!r}"[:300])
        parsed.append(_answer_object(item[0], item[1], None, f"item {index}"))
    return Answer(
        objects=parsed,
        background=background.strip() or DEFAULT_BACKGROUND,
        negative=_clean_negative(negative),
        has_ids=False,
    )


def _answer_object(phrase: object, box: object, object_id: object, where: str) -> AnswerObject:
    if not isinstance(phrase, str):
        raise LayoutParseError(f"{where}: the phrase must be a string")
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise LayoutParseError(f"{where} ({phrase!r}): the box must be 4 numbers [x, y, width, height]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        raise LayoutParseError(f"{where} ({phrase!r}): the box must hold numbers only")
    if object_id is not None and not isinstance(object_id, str | int):
        raise LayoutParseError(f"{where} ({phrase!r}): the id must be a string")
    try:
        return AnswerObject(id=None if object_id is None else str(object_id), phrase=phrase, box=tuple(box))
    except ValidationError as exc:  # non-finite numbers and the like
        raise LayoutParseError(f"{where} ({phrase!r}): {exc.errors()[0]['msg']}") from None


def _grid_box(box: tuple[float, float, float, float]) -> list[float | int]:
    return [int(v) if float(v).is_integer() else round(v, 2) for v in box]


def _clean_negative(value: str) -> str:
    value = value.strip().strip('"').strip()
    return "" if value.lower() in {"none", "none.", "n/a", "null"} else value


# ----------------------------------------------------------------------------------------
# 2. Validation and repair
# ----------------------------------------------------------------------------------------


def is_empty_box(box: tuple[float, float, float, float]) -> bool:
    return box[2] <= 0 or box[3] <= 0


def is_full_canvas_box(box: tuple[float, float, float, float], grid: int = GRID) -> bool:
    """A box at least as large as the canvas is the background, not an object (§1.4)."""
    return box[2] >= grid and box[3] >= grid


def _count_in_phrase(phrase: str) -> tuple[int, str] | None:
    """``("two red chairs")`` -> ``(2, "red chairs")``; None when the phrase carries no count above one."""
    match = re.match(r"^\s*(\w+)\s+(.+)$", phrase)
    if not match:
        return None
    word, rest = match.group(1).lower(), match.group(2)
    count = NUMBER_WORDS.get(word) or (int(word) if word.isdigit() and 2 <= int(word) <= 20 else None)
    return (count, rest) if count else None


def _split_box(box: tuple[float, float, float, float], count: int) -> list[tuple[float, float, float, float]]:
    """``count`` side-by-side boxes along the longer side of an xyxy box."""
    x0, y0, x1, y1 = box
    if (x1 - x0) >= (y1 - y0):
        step = (x1 - x0) / count
        return [(x0 + i * step, y0, x0 + (i + 1) * step, y1) for i in range(count)]
    step = (y1 - y0) / count
    return [(x0, y0 + i * step, x1, y0 + (i + 1) * step) for i in range(count)]


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def build_layout(
    answer: Answer,
    previous: Layout | None = None,
    max_objects: int = MAX_OBJECTS,
    split_counts: bool = True,
) -> Layout:
    """Validate and repair ``answer`` into a ``Layout``; each repair becomes a warning (§1.4).

    With ``previous`` (a revision, §1.7), objects that stayed keep their ids, and an object
    whose phrase and grid box did not change keeps ``previous``'s exact box.
    """
    warnings: list[str] = []
    pending: list[tuple[str | None, str, tuple[float, float, float, float]]] = []
    for item in answer.objects:
        phrase = " ".join(item.phrase.split()).rstrip(".")
        if not phrase:
            warnings.append(f"dropped: an object with an empty phrase (box {_grid_box(item.box)})")
            continue
        if len(phrase) > MAX_PHRASE_CHARS:
            warnings.append(f"phrase: cut {phrase[:40]!r}... to {MAX_PHRASE_CHARS} characters")
            phrase = phrase[:MAX_PHRASE_CHARS].rstrip()
        if is_empty_box(item.box):
            warnings.append(f"dropped: {phrase!r} has an empty box {_grid_box(item.box)}")
            continue
        if is_full_canvas_box(item.box):
            warnings.append(f"dropped: {phrase!r} covers the whole canvas {_grid_box(item.box)} (that is the background)")
            continue
        raw = xywh_to_xyxy(item.box)
        box = tuple(min(1.0, max(0.0, v)) for v in raw)
        if box[2] <= box[0] or box[3] <= box[1]:
            warnings.append(f"dropped: {phrase!r} box {_grid_box(item.box)} lies outside the canvas")
            continue
        if box != raw:
            warnings.append(f"clipped: {phrase!r} box {_grid_box(item.box)} to the canvas as {list(xyxy_to_xywh(box))}")
        counted = _count_in_phrase(phrase)
        if counted and split_counts:
            count, rest = counted
            longer_px = max(box[2] - box[0], box[3] - box[1]) * GRID
            if longer_px / count >= MIN_SPLIT_PX and len(pending) + count <= max_objects:
                single = singular_phrase(rest)
                parts = _split_box(box, count)
                warnings.append(f"split: {phrase!r} into {count} boxes of {single!r} along its longer side")
                pending.append((item.id, single, parts[0]))
                pending.extend((None, single, part) for part in parts[1:])
                continue
            warnings.append(f"count: {phrase!r} names {count} objects in one box; kept as one box (too small or too many to split)")
        elif counted:
            warnings.append(f"count: {phrase!r} names {counted[0]} objects in one box")
        pending.append((item.id, phrase, box))
    if len(pending) > max_objects:
        warnings.append(f"capped: kept the first {max_objects} of {len(pending)} objects")
        pending = pending[:max_objects]
    texts = {}
    for name in ("background", "negative"):
        value = getattr(answer, name)
        if len(value) > MAX_TEXT_CHARS:
            warnings.append(f"text: cut the {name} to {MAX_TEXT_CHARS} characters")
            value = value[:MAX_TEXT_CHARS].rstrip()
        texts[name] = value
    objects = _assign_ids(pending, previous, answer.has_ids, warnings)
    try:
        return Layout(objects=objects, warnings=warnings, **texts)
    except ValidationError as exc:  # a defect repair does not cover: report it like any unusable answer
        raise LayoutParseError(f"the layout is invalid: {exc.errors()[0]['msg']}") from None


def _assign_ids(
    pending: list[tuple[str | None, str, tuple[float, float, float, float]]],
    previous: Layout | None,
    trust_ids: bool,
    warnings: list[str],
) -> list[LayoutObject]:
    """Ids for the repaired objects: the answer's own, else the previous turn's by match, else new."""
    ids: list[str | None] = [None] * len(pending)
    taken: set[str] = set()
    prev = {o.id: o for o in previous.objects} if previous else {}
    # 1. An id the answer gives that names an object of the previous turn.
    if trust_ids:
        for i, (given, _, _) in enumerate(pending):
            if given in prev and given not in taken:
                ids[i] = given
                taken.add(given)
    # 2. Same phrase, best box overlap first (the LLM dropped or changed the id; a moved object still matches).
    if prev:
        pairs = []
        for i, (_, phrase, box) in enumerate(pending):
            for old in prev.values():
                if ids[i] is None and old.id not in taken and old.phrase.lower() == phrase.lower():
                    pairs.append((box_iou(box, old.box), i, old.id))
        for _, i, old_id in sorted(pairs, key=lambda p: -p[0]):
            if ids[i] is None and old_id not in taken:
                ids[i] = old_id
                taken.add(old_id)
        # 3. Same place, changed phrase ("make the cat black"): a strong overlap keeps the id.
        pairs = []
        for i, (_, _, box) in enumerate(pending):
            for old in prev.values():
                if ids[i] is None and old.id not in taken:
                    iou = box_iou(box, old.box)
                    if iou >= 0.5:
                        pairs.append((iou, i, old.id))
        for _, i, old_id in sorted(pairs, key=lambda p: -p[0]):
            if ids[i] is None and old_id not in taken:
                ids[i] = old_id
                taken.add(old_id)
    # 4. The answer's own new ids where free and well formed, else fresh ones from the phrase.
    for i, (given, phrase, _) in enumerate(pending):
        if ids[i] is not None:
            continue
        if trust_ids and given and _ID_OK.match(given) and given not in taken and given not in prev:
            ids[i] = given
        else:
            if trust_ids and given:
                warnings.append(f"id: replaced id {given!r} of {phrase!r} (taken or malformed)")
            ids[i] = next_object_id(None, phrase, taken | set(prev))
        taken.add(ids[i])
    objects = []
    for object_id, (_, phrase, box) in zip(ids, pending):
        old = prev.get(object_id)
        if old is not None and old.phrase == phrase and xyxy_to_xywh(box) == old.box_xywh():
            box = old.box  # unchanged on the grid: keep the exact box, not its re-rounded copy
        objects.append(LayoutObject(id=object_id, phrase=phrase, box=box))
    return objects


def parse_layout_text(text: str, previous: Layout | None = None, max_objects: int = MAX_OBJECTS) -> Layout:
    """Parse and repair an LLM answer into a ``Layout``; raise ``LayoutParseError`` on garbage."""
    return build_layout(parse_answer(text), previous=previous, max_objects=max_objects)
