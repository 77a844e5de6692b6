"""Reading an LLM answer: the objects as written, before any repair (docs/method.md §1.3).

``parse_answer(text) -> Answer`` finds a JSON object or the reference text format
(``[('a cat', [x, y, w, h]), ...]`` then ``Background prompt: ...``) inside the wrapping real
models add (fences, chatter, ``<think>`` blocks, trailing commas, boxes under other keys or
shapes, an answer cut at ``max_tokens``; the lenient readers are in lenient.py). Boxes stay
``[x, y, w, h]`` on the 512 grid as written. A reading that is not certain is recorded in
``Answer.notes`` (tags ``truncated``, ``scale``, ``box``, ``background``, ``ambiguous``);
an answer that cannot be read is a ``LayoutParseError`` naming why. Never ``eval``.
Repairing the answer into a layout is repair.py's part.
"""

from __future__ import annotations

import ast
import re

from pydantic import BaseModel, Field, ValidationError

from layout_planner.errors import LayoutParseError
from layout_planner.layout import DEFAULT_BACKGROUND, GRID, LayoutWarning
from layout_planner.lenient import (
    TUPLE,
    bracket_spans,
    complete_json_objects,
    fenced_blocks,
    json_string_field,
    load_json_like,
    read_tuples,
    strip_reasoning,
    without_fence_lines,
)

# "Background prompt:", "**Background prompt:**", "background:", "- Negative prompt: none"...
_LABEL = r"^[ \t>*_#-]*{word}(?:[ \t]+prompt)?[ \t]*[*_]*[ \t]*:[ \t]*[*_]*[ \t]*(?P<value>[^\n]*)$"
_BACKGROUND_LINE = re.compile(_LABEL.format(word="background"), re.IGNORECASE | re.MULTILINE)
_NEGATIVE_LINE = re.compile(_LABEL.format(word="negative"), re.IGNORECASE | re.MULTILINE)
_OBJECTS_LABEL = re.compile(r"\bobjects?[ \t]*[*_]*[ \t]*:", re.IGNORECASE)
_NOTHING = {"", "none", "n/a", "na", "null", "nil", "nothing", "no", "-", "--", "—", "[]", "empty", "not applicable"}

# JSON keys real models use for the same thing, in order of preference.
_OBJECTS_KEYS = ("objects", "boxes", "items", "layout")
_PHRASE_KEYS = ("phrase", "name", "label", "object", "description", "caption", "text", "class")
_BOX_KEYS = ("box", "bbox", "bounding_box", "box_2d", "coordinates", "coords", "rect", "xyxy", "box_xyxy")
_BACKGROUND_KEYS = ("background", "background_prompt", "background prompt", "bg_prompt", "scene")
_NEGATIVE_KEYS = ("negative", "negative_prompt", "negative prompt")
# Named box fields: [x, y, w, h], or two corners under any of these names.
_SIZE_NAMES = (("x", "y", "w", "h"), ("x", "y", "width", "height"), ("left", "top", "width", "height"))
_CORNER_NAMES = (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax"), ("x0", "y0", "x1", "y1"), ("left", "top", "right", "bottom"))  # fmt: skip

class AnswerObject(BaseModel):
    """One object as the LLM wrote it: box ``[x, y, w, h]`` on the 512 grid, unvalidated.

    ``bare_box``: the box came as a bare list of 4 numbers, so it could be corners given by
    mistake (a revision checks that against the previous layout, §1.7).
    """

    id: str | None = None
    phrase: str
    box: tuple[float, float, float, float]
    bare_box: bool = False


class Answer(BaseModel):
    """An LLM answer, parsed but not repaired. ``notes``: readings that were not certain (tagged lines)."""

    objects: list[AnswerObject] = Field(default_factory=list)
    background: str = DEFAULT_BACKGROUND
    negative: str = ""
    has_ids: bool = False
    notes: list[LayoutWarning] = Field(default_factory=list)


def parse_answer(text: str | None) -> Answer:
    """Parse JSON or the reference text format out of an answer; raise ``LayoutParseError`` naming the problem."""
    if text is None or not text.strip():
        raise LayoutParseError("the answer is empty")
    text = strip_reasoning(text)
    if not text:
        raise LayoutParseError("the answer holds reasoning only, no layout")
    plain = without_fence_lines(text)
    backgrounds = list(_BACKGROUND_LINE.finditer(plain))
    head = plain[: backgrounds[0].start()] if backgrounds else ""
    if backgrounds and ("{" not in head or TUPLE.search(head)):
        answer = _parse_reference_text(plain, backgrounds)
    else:
        answer = _parse_json_answer(text)
    return _read_fractions(answer)


# --- JSON ---------------------------------------------------------------------------------


def _parse_json_answer(text: str) -> Answer:
    """The last JSON layout in the answer (fenced blocks first); a truncated one keeps its complete objects."""
    values: list[object] = []
    errors: list[str] = []
    unclosed: str | None = None
    for openers in ("{[", "{"):  # then objects only: a stray "[" in the chatter must not hide the layout
        for block in fenced_blocks(text) or [text]:
            for start, end in bracket_spans(block, openers):
                if end < 0:
                    unclosed = unclosed or block[start:]
                    continue
                try:
                    values.append(load_json_like(block[start:end]))
                except ValueError as exc:
                    errors.append(str(exc))
        if any(_holds_objects(v) for v in values):
            break
    layouts = [v for v in values if _holds_objects(v)]
    if any(isinstance(_unwrap(v), dict) for v in layouts):  # a layout object beats a bare list in the chatter
        layouts = [v for v in layouts if isinstance(_unwrap(v), dict)]
    if layouts:
        answer = _answer_from_json(layouts[-1])
        if len({repr(v) for v in layouts}) > 1:
            answer.notes.insert(0, LayoutWarning(tag="ambiguous", text=f"the answer holds {len(layouts)} different layouts; used the last one"))
        return answer
    if unclosed is not None:
        return _salvage_truncated(unclosed)
    dicts = [v for v in values if isinstance(v, dict)]
    if dicts:
        return _answer_from_json(dicts[-1])  # raises, naming what the object lacks
    if errors:
        raise LayoutParseError(errors[0])
    raise LayoutParseError(
        "the answer is neither a JSON object nor a list of ('phrase', [x, y, w, h]) followed by 'Background prompt:'"
    )


def _unwrap(value: object) -> object:
    """Keys in lower case (``"Objects"``), and ``{"layout": {...}}`` -> ``{...}`` (one level of wrapping)."""
    if isinstance(value, dict):
        value = {str(k).lower(): v for k, v in value.items()}
        if not any(k in value for k in _OBJECTS_KEYS[:3]) and len(value) == 1:
            inner = next(iter(value.values()))
            if isinstance(inner, dict):
                return {str(k).lower(): v for k, v in inner.items()}
    return value


def _objects_of(data: dict) -> object:
    return next((data[k] for k in _OBJECTS_KEYS if isinstance(data.get(k), list)), data.get("objects"))


def _holds_objects(value: object) -> bool:
    value = _unwrap(value)
    if isinstance(value, dict):
        return isinstance(_objects_of(value), list)
    return isinstance(value, list) and all(
        isinstance(item, dict) or (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str))
        for item in value
    )


def _answer_from_json(value: object) -> Answer:
    value = _unwrap(value)
    notes: list[LayoutWarning] = []
    if isinstance(value, list):
        data: dict = {"objects": value}
        notes.append(LayoutWarning(tag="background", text=f"the answer gave no background; used {DEFAULT_BACKGROUND!r}"))
    elif isinstance(value, dict):
        data = value
    else:
        raise LayoutParseError("the JSON answer must be an object with 'objects', 'background', 'negative'")
    objects = _objects_of(data)
    if objects is None:
        raise LayoutParseError("the JSON answer has no 'objects' list")
    if not isinstance(objects, list):
        raise LayoutParseError("'objects' must be a list")
    parsed = [_json_object(item, f"objects[{index}]", notes) for index, item in enumerate(objects)]
    return Answer(
        objects=parsed,
        background=_text_field(data, _BACKGROUND_KEYS, "background") or DEFAULT_BACKGROUND,
        negative=_clean_negative(_text_field(data, _NEGATIVE_KEYS, "negative")),
        has_ids=any(o.id is not None for o in parsed),
        notes=notes,
    )


def _text_field(data: dict, keys: tuple[str, ...], name: str) -> str:
    value = next((data[k] for k in keys if k in data), None)
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(v.strip() for v in value if v.strip())  # "negative": ["people", "cars"]
    if not isinstance(value, str):
        raise LayoutParseError(f"'{name}' must be a string")
    return value.strip()


def _json_object(item: object, where: str, notes: list[LayoutWarning]) -> AnswerObject:
    if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str):
        return _answer_object(item[0], item[1], None, where, notes)  # a reference tuple inside JSON
    if not isinstance(item, dict):
        raise LayoutParseError(f"{where} must be an object with 'phrase' and 'box'")
    fields = {str(k).lower(): v for k, v in item.items()}
    phrase = next((fields[k] for k in _PHRASE_KEYS if k in fields), None)
    if phrase is None:
        raise LayoutParseError(f"{where} has no 'phrase'")
    key = next((k for k in _BOX_KEYS if k in fields), None)
    box = fields[key] if key else {k: v for k, v in fields.items() if k not in _PHRASE_KEYS and k != "id"} or None
    object_id = fields.get("id")
    return _answer_object(phrase, box, object_id, where, notes, box_key=key or "box")


# --- the reference text format ------------------------------------------------------------


def _parse_reference_text(text: str, backgrounds: list[re.Match]) -> Answer:
    """``[('a cat', [x, y, w, h]), ...]`` then ``Background prompt: ...`` then optional ``Negative prompt: ...``."""
    if len(backgrounds) > 1:
        raise LayoutParseError("the answer has more than one 'Background prompt:' line")
    label = backgrounds[0]
    head, tail = text[: label.start()], text[label.end() :]
    background = _label_value(label.group("value"), tail)
    negative = ""
    negative_label = _NEGATIVE_LINE.search(tail)
    if negative_label is not None:
        negative = _label_value(negative_label.group("value"), tail[negative_label.end() :])
    elif (negative_label := _NEGATIVE_LINE.search(head)) is not None:  # written before the background
        negative = _label_value(negative_label.group("value"), head[negative_label.end() :])
        head = head[: negative_label.start()]
    labels = list(_OBJECTS_LABEL.finditer(head))
    if labels:
        head = head[labels[-1].end() :]
    notes: list[LayoutWarning] = []
    parsed = [_answer_object(p, b, None, f"item {i}", notes) for i, (p, b) in enumerate(_object_items(head))]
    return Answer(
        objects=parsed,
        background=background or DEFAULT_BACKGROUND,
        negative=_clean_negative(negative),
        has_ids=False,
        notes=notes,
    )


def _label_value(value: str, following: str) -> str:
    """A label's value: the rest of its line, else the next non-empty line (``Background prompt:\\nA park``)."""
    value = _strip_markup(value)
    if value:
        return value
    for line in following.splitlines():
        if _NEGATIVE_LINE.match(line) or _BACKGROUND_LINE.match(line):
            return ""
        if line.strip():
            return _strip_markup(line)
    return ""


def _strip_markup(value: str) -> str:
    return value.strip().strip("*_`").strip().strip('"').strip()


def _object_items(head: str) -> list[tuple[object, object]]:
    """The ``('phrase', box)`` items before the background line: a Python literal, else tuple by tuple."""
    if not re.search(r"[\[(]", head):
        if not head.strip() or re.search(r"\b(no objects|none)\b", head, re.IGNORECASE):
            return []
        raise LayoutParseError("expected a list of ('phrase', [x, y, w, h]) before 'Background prompt:'")
    problem = "expected a list of ('phrase', [x, y, w, h]) before 'Background prompt:'"
    spans = [(start, end) for start, end in bracket_spans(head, "[(") if end > 0]
    for start, end in spans:
        if len(spans) > 1 and head[start] == "(":
            continue  # one tuple per line ("1. ('a cat', [...])"): read below, tuple by tuple
        try:
            value = ast.literal_eval(head[start:end])
        except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
            problem = f"the object list is not a valid literal: {exc}"
            continue
        items = _as_items(value)
        if items is not None:
            return items
    items = read_tuples(head)
    if items is not None:
        return items
    raise LayoutParseError(problem[:300])


def _as_items(value: object) -> list[tuple[object, object]] | None:
    """A list of pairs from a literal: ``[(p, b), ...]``, one bare pair, or a list wrapped in a list."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return [value]
    while isinstance(value, list | tuple) and len(value) == 1 and isinstance(value[0], list) and not (
        len(value[0]) == 2 and isinstance(value[0][0], str)
    ):
        value = value[0]
    if not isinstance(value, list | tuple):
        return None
    items = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise LayoutParseError(f"item {len(items)} must be ('phrase', [x, y, w, h]), got {item!r}"[:300])
        items.append((item[0], item[1]))
    return items


# --- truncated answers ----------------------------------------------------------------------


def _salvage_truncated(fragment: str) -> Answer:
    """An answer cut mid-way: keep its complete objects, say so; nothing complete is an error."""
    notes: list[LayoutWarning] = []
    if fragment.startswith("{"):
        items = next((found for k in _OBJECTS_KEYS if (found := complete_json_objects(fragment, k))), [])
        if not items:
            raise LayoutParseError("the JSON object is not closed (truncated answer?)")
        objects = [_json_object(item, f"objects[{i}]", notes) for i, item in enumerate(items)]
        background = json_string_field(fragment, "background") or ""
        negative = json_string_field(fragment, "negative") or ""
    else:
        pairs = read_tuples(fragment, partial_tail=True) or [
            (item.get("phrase"), item.get("box")) for item in complete_json_objects('"objects": ' + fragment)
        ]
        if not pairs:
            raise LayoutParseError("the object list is not closed (truncated answer?)")
        objects = [_answer_object(p, b, None, f"item {i}", notes) for i, (p, b) in enumerate(pairs)]
        background, negative = "", ""
    notes.insert(0, LayoutWarning(
        tag="truncated",
        text=f"the answer stops mid-way (cut at max_tokens?); kept its {len(objects)} complete object(s)"
        + ("" if background else f", background {DEFAULT_BACKGROUND!r}"),
    ))
    return Answer(
        objects=objects,
        background=background or DEFAULT_BACKGROUND,
        negative=_clean_negative(negative),
        has_ids=any(o.id is not None for o in objects),
        notes=notes,
    )


# --- objects and boxes ----------------------------------------------------------------------


def _answer_object(
    phrase: object, box: object, object_id: object, where: str, notes: list[LayoutWarning], box_key: str = "box"
) -> AnswerObject:
    if not isinstance(phrase, str):
        raise LayoutParseError(f"{where}: the phrase must be a string")
    xywh, bare = _read_box(box, box_key, f"{where} ({phrase!r})", notes)
    if isinstance(object_id, bool) or (object_id is not None and not isinstance(object_id, str | int)):
        object_id = None  # an id we cannot use is replaced later; the object itself is fine
    try:
        return AnswerObject(
            id=None if object_id in (None, "") else str(object_id), phrase=phrase, box=xywh, bare_box=bare
        )
    except ValidationError as exc:  # non-finite numbers and the like
        raise LayoutParseError(f"{where} ({phrase!r}): {exc.errors()[0]['msg']}") from None


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().rstrip("px").strip())
        except ValueError:
            return None
    return None


def _read_box(box: object, key: str, where: str, notes: list[LayoutWarning]) -> tuple[tuple[float, ...], bool]:
    """``[x, y, w, h]`` from a list, a string of numbers, or named fields; corners are converted."""
    if isinstance(box, dict):
        fields = {str(k).lower(): v for k, v in box.items()}
        for names in _SIZE_NAMES + _CORNER_NAMES:
            if all(n in fields for n in names):
                values = [_number(fields[n]) for n in names]
                if any(v is None for v in values):
                    raise LayoutParseError(f"{where}: the box must hold numbers only")
                if names in _CORNER_NAMES:
                    return (values[0], values[1], values[2] - values[0], values[3] - values[1]), False
                return tuple(values), False
        raise LayoutParseError(
            f"{where}: the box must be [x, y, width, height] (got the fields {sorted(fields)[:6]})"
        )
    if isinstance(box, str):
        inner = box.strip().strip("[]()")
        if re.search(r"[^\d\s.,+eE-]", inner):
            raise LayoutParseError(f"{where}: the box must hold numbers only")
        box = [v for v in re.split(r"[\s,]+", inner) if v]
    while isinstance(box, list | tuple) and len(box) == 1 and isinstance(box[0], list | tuple):
        box = box[0]  # [[x, y, w, h]]
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise LayoutParseError(f"{where}: the box must be 4 numbers [x, y, width, height]")
    values = [_number(v) for v in box]
    if any(v is None for v in values):
        raise LayoutParseError(f"{where}: the box must hold numbers only")
    if key == "box_2d":  # Gemini's convention for this key: [ymin, xmin, ymax, xmax] on a 0..1000 grid
        y0, x0, y1, x1 = (v * GRID / 1000 for v in values)
        notes.append(LayoutWarning(tag="box", text=f"read {where} 'box_2d' {box} as [ymin, xmin, ymax, xmax] on a 0..1000 grid"))
        return (x0, y0, x1 - x0, y1 - y0), False
    if key in ("xyxy", "box_xyxy"):
        return (values[0], values[1], values[2] - values[0], values[3] - values[1]), False
    return tuple(values), True


def _read_fractions(answer: Answer) -> Answer:
    """Boxes whose numbers all lie in 0..1 (some fractional) are fractions of the canvas, not pixels."""
    values = [v for o in answer.objects for v in o.box]
    if not values or not all(0 <= v <= 1 for v in values) or all(float(v).is_integer() for v in values):
        return answer
    answer.objects = [o.model_copy(update={"box": tuple(v * GRID for v in o.box)}) for o in answer.objects]
    answer.notes.append(LayoutWarning(tag="scale", text=f"every box number lies in 0..1; read them as fractions of the {GRID} x {GRID} canvas"))
    return answer


def _clean_negative(value: str) -> str:
    value = _strip_markup(value).rstrip(".").strip()
    if value.lower() in _NOTHING or re.match(r"^(none|n/a|nothing)\b[\s(.,;:-]", value, re.IGNORECASE):
        return ""
    return value
