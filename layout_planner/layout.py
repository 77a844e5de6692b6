"""The layout: the contract between stage 1 (the planner) and stage 2 (the controller).

docs/method.md §0. Boxes are stored as normalised corners ``[x0, y0, x1, y1]`` in 0..1 with
the origin at the top left. LLMs speak ``[x, y, width, height]`` on a 512x512 grid; the
conversions below are the only place that grid appears.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GRID = 512
DEFAULT_BACKGROUND = "a realistic scene"
MAX_OBJECTS = 30
MAX_PHRASE_CHARS = 200
MAX_TEXT_CHARS = 1000  # background and negative prompt
# Warnings are bounded like every other stored field: an LLM answer with thousands of broken
# objects (or a client's layout) must not make a record of hundreds of kB.
MAX_WARNINGS = 40
MAX_WARNING_CHARS = 300

Box = Annotated[
    tuple[float, float, float, float],
    Field(description="normalised [x0, y0, x1, y1] in 0..1, origin top-left"),
]


WarningTag = Literal[
    # repairs of the answer's objects
    "dropped", "clipped", "split", "count", "capped", "phrase", "text", "id",
    # readings that were not certain
    "truncated", "ambiguous", "background", "box", "scale",
    # a revision answer that left objects out; what a revision removed or renamed
    "kept", "removed", "renamed",
    # stage 2 stretched the boxes to span the canvas (layout_planner.rescale)
    "rescaled",
]
WARNING_TAGS: tuple[str, ...] = get_args(WarningTag)


class LayoutWarning(BaseModel):
    """One thing the planner changed, or was unsure of, while turning an answer into a layout.

    Code decides on ``tag``; ``text`` is for people. ``str()`` gives the one-line form
    ``"tag: text"`` the CLI prints; that line is also accepted as input (layouts saved before
    warnings had fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tag: WarningTag
    # The limit is checked where a layout is validated (``Layout``), after repair has cut the
    # texts (``bounded_warnings``), so that building a long warning never fails midway.
    text: str = Field(json_schema_extra={"maxLength": MAX_WARNING_CHARS})

    @model_validator(mode="before")
    @classmethod
    def _from_line(cls, value: object) -> object:
        if isinstance(value, str):
            tag, _, text = value.partition(": ")
            return {"tag": tag, "text": text}
        return value

    def __str__(self) -> str:
        return f"{self.tag}: {self.text}"


def bounded_warnings(warnings: list[LayoutWarning]) -> list[LayoutWarning]:
    """``warnings`` within ``MAX_WARNINGS`` of ``MAX_WARNING_CHARS`` characters of text: long texts
    are cut, and the warnings past the limit become one closing ``capped`` warning that counts them."""
    cut = [w if len(w.text) <= MAX_WARNING_CHARS else w.model_copy(update={"text": w.text[: MAX_WARNING_CHARS - 3] + "..."}) for w in warnings]
    if len(cut) <= MAX_WARNINGS:
        return cut
    kept = cut[: MAX_WARNINGS - 1]
    return kept + [LayoutWarning(tag="capped", text=f"... and {len(cut) - len(kept)} more warnings")]


# The object id alphabet, decided here once (the API's schema and the mask file names use it):
# 1-32 letters, digits, '_', '.', '-', the first a letter, digit or '_'. So no id is '.', '..',
# a hidden file name or an option-like '-x', and ``<id>.png`` is a safe file name on its own.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
ID_RULE = "1-32 characters of letters, digits, '_', '.', '-', the first a letter, digit or '_'"


def mask_file_name(object_id: str) -> str:
    """The file name of an object's mask, ``<id>.png``; a ValueError for an id outside the alphabet
    (a layout never holds one: this guards the file system against a record built another way)."""
    if not ID_PATTERN.match(object_id):
        raise ValueError(f"object id {object_id!r} is not a valid id ({ID_RULE})")
    return f"{object_id}.png"


def xywh_to_xyxy(box: tuple[float, float, float, float] | list[float], grid: int = GRID) -> tuple[float, float, float, float]:
    """``[x, y, w, h]`` on a ``grid`` x ``grid`` canvas -> normalised ``[x0, y0, x1, y1]`` (not clipped)."""
    x, y, w, h = (float(v) for v in box)
    return (x / grid, y / grid, (x + w) / grid, (y + h) / grid)


def xyxy_to_xywh(box: tuple[float, float, float, float] | list[float], grid: int = GRID) -> tuple[int, int, int, int]:
    """Normalised ``[x0, y0, x1, y1]`` -> integer ``[x, y, w, h]`` on a ``grid`` canvas."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x, y = round(x0 * grid), round(y0 * grid)
    return (x, y, round(x1 * grid) - x, round(y1 * grid) - y)


def is_empty_box(box: tuple[float, float, float, float]) -> bool:
    """An ``[x, y, w, h]`` box without area."""
    return box[2] <= 0 or box[3] <= 0


def is_full_canvas_box(box: tuple[float, float, float, float], grid: int = GRID) -> bool:
    """An ``[x, y, w, h]`` box at least as large as the canvas is the background, not an object (§1.4)."""
    return box[2] >= grid and box[3] >= grid


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0

class LayoutObject(BaseModel):
    """One instance of one object: a phrase and its box."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="short stable identifier; survives multi-turn edits")
    phrase: str = Field(min_length=1, max_length=MAX_PHRASE_CHARS, description="English noun phrase for ONE instance")
    box: Box

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not ID_PATTERN.match(value):
            raise ValueError(f"object id {value[:40]!r} must be {ID_RULE}")
        return value

    @field_validator("phrase")
    @classmethod
    def _check_phrase(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("phrase is empty")
        return value

    @field_validator("box")
    @classmethod
    def _check_box(cls, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"box {list(box)} leaves the canvas: every corner must lie in 0..1")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {list(box)} has zero area: need x0 < x1 and y0 < y1")
        return box

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def box_xywh(self, grid: int = GRID) -> tuple[int, int, int, int]:
        return xyxy_to_xywh(self.box, grid)

    def box_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Integer pixel corners on a ``width`` x ``height`` image, at least one pixel wide."""
        x0, y0, x1, y1 = self.box
        px0, py0 = int(x0 * width), int(y0 * height)
        px1 = max(px0 + 1, min(width, round(x1 * width)))
        py1 = max(py0 + 1, min(height, round(y1 * height)))
        return (px0, py0, px1, py1)


class Layout(BaseModel):
    """A scene plan: boxed objects, a background caption, a negative prompt, repair warnings."""

    model_config = ConfigDict(extra="forbid")

    objects: list[LayoutObject] = Field(default_factory=list, max_length=MAX_OBJECTS)
    background: str = Field(default=DEFAULT_BACKGROUND, max_length=MAX_TEXT_CHARS)
    negative: str = Field(default="", max_length=MAX_TEXT_CHARS)
    warnings: list[LayoutWarning] = Field(
        default_factory=list, max_length=MAX_WARNINGS, description="what reading and repair changed or were unsure of"
    )

    @field_validator("warnings")
    @classmethod
    def _bounded_warnings(cls, warnings: list[LayoutWarning]) -> list[LayoutWarning]:
        long = next((w for w in warnings if len(w.text) > MAX_WARNING_CHARS), None)
        if long is not None:
            raise ValueError(f"a warning's text has {len(long.text)} characters; at most {MAX_WARNING_CHARS} are allowed")
        return warnings

    @field_validator("background")
    @classmethod
    def _default_background(cls, value: str) -> str:
        return value.strip() or DEFAULT_BACKGROUND

    @field_validator("negative")
    @classmethod
    def _strip_negative(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _unique_ids(self) -> "Layout":
        seen: set[str] = set()
        for obj in self.objects:
            if obj.id in seen:
                raise ValueError(f"object id {obj.id!r} appears twice; ids must be unique")
            seen.add(obj.id)
        return self

    def object(self, object_id: str) -> LayoutObject:
        for obj in self.objects:
            if obj.id == object_id:
                return obj
        raise KeyError(object_id)

    def phrases(self) -> list[str]:
        return [obj.phrase for obj in self.objects]

    def to_reference_text(self) -> str:
        """The layout in the reference LMD text format (xywh on the 512 grid)."""
        items = ", ".join(f"({obj.phrase!r}, {list(obj.box_xywh())})" for obj in self.objects)
        return f"[{items}]\nBackground prompt: {self.background}\nNegative prompt: {self.negative}"

    def to_llm_json(self) -> str:
        """The layout as the planner's JSON answer format (xywh on the 512 grid, with ids)."""
        return json.dumps(
            {
                "objects": [{"id": o.id, "phrase": o.phrase, "box": list(o.box_xywh())} for o in self.objects],
                "background": self.background,
                "negative": self.negative,
            }
        )


def next_object_id(layout: Layout | None, phrase: str, taken: set[str] | None = None) -> str:
    """A new id from the phrase's head word, unique within ``layout`` and ``taken``: ``cat``, ``cat_2``..."""
    used = set(taken or ())
    if layout is not None:
        used |= {o.id for o in layout.objects}
    words = re.findall(r"[a-z0-9]+", phrase.lower())
    stem = (words[-1] if words else "obj")[:24]
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    return candidate
