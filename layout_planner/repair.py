"""Repairing a read answer into a valid layout (docs/method.md §1.4).

``build_layout(answer, previous=None) -> Layout`` drops what cannot be an object (an empty
phrase, an empty box, a whole-canvas box, a box outside the canvas), clips boxes to the
canvas, splits a counted phrase ("two red chairs") into boxes of its singular, caps the object
count, cuts over-long texts and assigns ids (ids.py; a revision keeps the previous turn's ids
for objects that stayed, §1.7). Every change becomes a tagged :class:`LayoutWarning`
(``dropped``, ``clipped``, ``split``, ``count``, ``capped``, ``phrase``, ``text``, ``id``,
``box``), after the notes of reading (read.py).
"""

from __future__ import annotations

from pydantic import ValidationError

from layout_planner.errors import LayoutParseError
from layout_planner.ids import Pending, assign_ids
from layout_planner.layout import (
    GRID,
    MAX_OBJECTS,
    MAX_PHRASE_CHARS,
    MAX_TEXT_CHARS,
    Box,
    Layout,
    LayoutWarning,
    bounded_warnings,
    is_empty_box,
    is_full_canvas_box,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from layout_planner.read import Answer, AnswerObject
from layout_planner.words import count_in_phrase, singular_phrase

# A count phrase is split only while every part keeps at least this many grid pixels along the split.
MIN_SPLIT_PX = 24


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
    warnings: list[LayoutWarning] = list(answer.notes)
    objects = answer.objects
    if previous is not None and _gave_corners(objects, previous):
        objects = [o.model_copy(update={"box": _corners_to_xywh(o.box)}) if o.bare_box else o for o in objects]
        warnings.append(LayoutWarning(
            tag="box",
            text="read the boxes as corners [x0, y0, x1, y1]: that way, unlike as [x, y, w, h], they repeat boxes of the previous layout",
        ))
    pending: list[Pending] = []
    for item in objects:
        pending += _repair_object(item, warnings, room=max_objects - len(pending) if split_counts else None)
    if len(pending) > max_objects:
        warnings.append(LayoutWarning(tag="capped", text=f"kept the first {max_objects} of {len(pending)} objects"))
        pending = pending[:max_objects]
    texts = {name: _cut_text(name, getattr(answer, name), warnings) for name in ("background", "negative")}
    layout_objects = assign_ids(pending, previous, answer.has_ids, warnings)
    try:
        return Layout(objects=layout_objects, warnings=bounded_warnings(warnings), **texts)
    except ValidationError as exc:  # a defect repair does not cover: report it like any unusable answer
        raise LayoutParseError(f"the layout is invalid: {exc.errors()[0]['msg']}") from None


def _repair_object(item: AnswerObject, warnings: list[LayoutWarning], room: int | None) -> list[Pending]:
    """The object as zero (dropped), one, or several (a split count) pending objects.

    ``room``: how many objects a split may still add; None when counts are not split."""
    phrase = " ".join(item.phrase.split()).rstrip(".")
    if not phrase:
        warnings.append(LayoutWarning(tag="dropped", text=f"an object with an empty phrase (box {_grid_box(item.box)})"))
        return []
    if len(phrase) > MAX_PHRASE_CHARS:
        warnings.append(LayoutWarning(tag="phrase", text=f"cut {phrase[:40]!r}... to {MAX_PHRASE_CHARS} characters"))
        phrase = phrase[:MAX_PHRASE_CHARS].rstrip()
    box = _canvas_box(item, phrase, warnings)
    if box is None:
        return []
    counted = count_in_phrase(phrase)
    if counted and room is not None:
        count, rest = counted
        longer_px = max(box[2] - box[0], box[3] - box[1]) * GRID
        if longer_px / count >= MIN_SPLIT_PX and count <= room:
            single = singular_phrase(rest)
            parts = _split_box(box, count)
            warnings.append(LayoutWarning(tag="split", text=f"{phrase!r} into {count} boxes of {single!r} along its longer side"))
            return [Pending(item.id, single, parts[0])] + [Pending(None, single, part) for part in parts[1:]]
        warnings.append(LayoutWarning(tag="count", text=f"{phrase!r} names {count} objects in one box; kept as one box (too small or too many to split)"))
    elif counted:
        warnings.append(LayoutWarning(tag="count", text=f"{phrase!r} names {counted[0]} objects in one box"))
    return [Pending(item.id, phrase, box)]


def _canvas_box(item: AnswerObject, phrase: str, warnings: list[LayoutWarning]) -> Box | None:
    """The object's box as normalised xyxy clipped to the canvas; None (with a warning) when it is no object's box."""
    if is_empty_box(item.box):
        warnings.append(LayoutWarning(tag="dropped", text=f"{phrase!r} has an empty box {_grid_box(item.box)}"))
        return None
    if is_full_canvas_box(item.box):
        warnings.append(LayoutWarning(tag="dropped", text=f"{phrase!r} covers the whole canvas {_grid_box(item.box)} (that is the background)"))
        return None
    raw = xywh_to_xyxy(item.box)
    box = tuple(min(1.0, max(0.0, v)) for v in raw)
    if box[2] <= box[0] or box[3] <= box[1]:
        warnings.append(LayoutWarning(tag="dropped", text=f"{phrase!r} box {_grid_box(item.box)} lies outside the canvas"))
        return None
    if box != raw:
        hint = " (it would fit as corners [x0, y0, x1, y1])" if item.bare_box and _fits_as_corners(item.box) else ""
        warnings.append(LayoutWarning(tag="clipped", text=f"{phrase!r} box {_grid_box(item.box)} to the canvas as {list(xyxy_to_xywh(box))}{hint}"))
    return box


def _cut_text(name: str, value: str, warnings: list[LayoutWarning]) -> str:
    if len(value) > MAX_TEXT_CHARS:
        warnings.append(LayoutWarning(tag="text", text=f"cut the {name} to {MAX_TEXT_CHARS} characters"))
        value = value[:MAX_TEXT_CHARS].rstrip()
    return value


def _split_box(box: Box, count: int) -> list[Box]:
    """``count`` side-by-side boxes along the longer side of an xyxy box."""
    x0, y0, x1, y1 = box
    if (x1 - x0) >= (y1 - y0):
        step = (x1 - x0) / count
        return [(x0 + i * step, y0, x0 + (i + 1) * step, y1) for i in range(count)]
    step = (y1 - y0) / count
    return [(x0, y0 + i * step, x1, y0 + (i + 1) * step) for i in range(count)]


def _grid_box(box: Box) -> list[float | int]:
    return [int(v) if float(v).is_integer() else round(v, 2) for v in box]


def _corners_to_xywh(box: Box) -> Box:
    return (box[0], box[1], box[2] - box[0], box[3] - box[1])


def _fits_as_corners(box: Box) -> bool:
    return 0 <= box[0] < box[2] <= GRID and 0 <= box[1] < box[3] <= GRID


def _gave_corners(objects: list[AnswerObject], previous: Layout) -> bool:
    """Whether a revision's bare boxes are corners given by mistake (§1.7).

    Evidence, not a guess: read as corners, some boxes equal (within 2 grid px) boxes of the
    previous layout, read as [x, y, w, h] none does, and every box is valid as corners.
    """
    bare = [o.box for o in objects if o.bare_box]
    old = [o.box_xywh() for o in previous.objects]

    def repeats(box: tuple[float, ...]) -> bool:
        return any(all(abs(a - b) <= 2 for a, b in zip(box, p)) for p in old)

    if not bare or not all(_fits_as_corners(b) for b in bare):
        return False
    return any(repeats(_corners_to_xywh(b)) for b in bare) and not any(repeats(b) for b in bare)
