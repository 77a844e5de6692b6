"""The LMD benchmark: prompt specs and the published layout-level rules (benchmarks/data/SOURCE.md).

The rules work on *detections*: a list of ``(name, box)`` pairs with ``box`` normalised
``[x0, y0, x1, y1]``. A layout gives one detection per object (``layout_detections``); an
image-level evaluation can pass a detector's output (query label, box) to the SAME rules.

How a box is matched to an object (the published code used substring tests; we use words):

- A box names exactly ONE object: the head noun of its phrase, singular (``"a red backpack"``
  and ``"two backpacks"`` both name ``backpack``; ``"a dog with a red collar"`` names ``dog``;
  ``"a carrot"`` does not name ``car``). See ``layout_planner.words.head_noun``.
- Counting counts boxes: a box whose phrase says ``"two chairs"`` is ONE chair (a layout box
  is one instance, and a detector box is one detection). That is why a layout that puts two
  chairs in one box fails numeracy, as it did in the published evaluation.
- A (colour, object) pair is named by a box whose head noun is the object and whose
  modifiers (the words before the head noun) contain the colour word.
- Spatial compares the centres of the FIRST box naming each object.

Before scoring an LLM answer, boxes that are empty (no area on the canvas) or cover the whole
canvas are dropped (the published rule; the reference also dropped boxes starting beyond the
canvas, which have no area on it). Boxes are not clipped or split for scoring.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel

from layout_planner.layout import GRID, Layout, box_iou, is_full_canvas_box, xywh_to_xyxy
from layout_planner.read import Answer
from layout_planner.words import COLOURS, NUMBER_WORDS, head_noun, modifiers

Task = Literal["negation", "numeracy", "attribution", "spatial"]
Relation = Literal["left", "right", "top", "bottom"]
XYXY = tuple[float, float, float, float]
Detection = tuple[str, XYXY]
TASKS: tuple[Task, ...] = ("negation", "numeracy", "attribution", "spatial")

_COUNTS = {"one": 1, "a": 1, "an": 1, **NUMBER_WORDS}


class BenchmarkPromptError(ValueError):
    """A prompt that does not follow any of the benchmark's four patterns."""


class BenchmarkSpec(BaseModel):
    """What a benchmark prompt asks for. ``objects`` are singular head nouns."""

    task: Task
    prompt: str
    objects: list[str]
    count: int | None = None  # numeracy
    colours: list[str] = []  # attribution, one per object
    relation: Relation | None = None  # spatial: objects[0] is on this side of objects[1]


class RuleResult(BaseModel):
    passed: bool
    detail: str


# ----------------------------------------------------------------------------------------
# Prompts -> specs
# ----------------------------------------------------------------------------------------

_NEGATION = re.compile(r"\bwithout\s+(?:any\s+)?(?P<what>.+)$", re.IGNORECASE)
_SPATIAL = re.compile(
    r"\bwith\s+(?P<a>.+?)\s+on the\s+(?P<ra>left|right|top|bottom)\s+and\s+(?P<b>.+?)\s+on the\s+(?P<rb>left|right|top|bottom)$",
    re.IGNORECASE,
)
_NUMERACY = re.compile(r"\bwith\s+(?P<n>\w+)\s+(?P<what>[^,]+?)$", re.IGNORECASE)
_ATTRIBUTION = re.compile(r"\bwith\s+(?P<a>.+?)\s+and\s+(?P<b>.+)$", re.IGNORECASE)


def parse_benchmark_prompt(prompt: str, task: Task | None = None) -> BenchmarkSpec:
    """The spec of a benchmark prompt; ``task`` (from the prompts file) picks the pattern, else inferred."""
    text = prompt.strip().rstrip(".")
    spatial = _SPATIAL.search(text)
    negation = _NEGATION.search(text)
    numeracy = _NUMERACY.search(text)
    if numeracy and numeracy.group("n").lower() not in _COUNTS and not numeracy.group("n").isdigit():
        numeracy = None
    if numeracy and " and " in numeracy.group("what"):
        numeracy = None
    attribution = _ATTRIBUTION.search(text)
    if task is None:
        task = (
            "negation" if negation else
            "spatial" if spatial else
            "numeracy" if numeracy else
            "attribution" if attribution else None
        )  # fmt: skip
    if task == "negation" and negation:
        return BenchmarkSpec(task=task, prompt=prompt, objects=[head_noun(negation.group("what"))])
    if task == "spatial" and spatial:
        return BenchmarkSpec(
            task=task,
            prompt=prompt,
            objects=[head_noun(spatial.group("a")), head_noun(spatial.group("b"))],
            relation=spatial.group("ra").lower(),
        )
    if task == "numeracy" and numeracy:
        word = numeracy.group("n").lower()
        count = int(word) if word.isdigit() else _COUNTS[word]
        return BenchmarkSpec(task=task, prompt=prompt, objects=[head_noun(numeracy.group("what"))], count=count)
    if task == "attribution" and attribution:
        objects, colours = [], []
        for part in (attribution.group("a"), attribution.group("b")):
            colour = next((w for w in modifiers(part) if w in COLOURS), None)
            if colour is None:
                raise BenchmarkPromptError(f"attribution prompt part {part!r} names no colour: {prompt!r}")
            objects.append(head_noun(part))
            colours.append(colour)
        return BenchmarkSpec(task=task, prompt=prompt, objects=objects, colours=colours)
    raise BenchmarkPromptError(f"not a benchmark prompt of task {task or 'any'}: {prompt!r}")


# ----------------------------------------------------------------------------------------
# Detections
# ----------------------------------------------------------------------------------------


def layout_detections(layout: Layout) -> list[Detection]:
    """One detection per layout object, in layout order."""
    return [(o.phrase, tuple(o.box)) for o in layout.objects]


def answer_detections(answer: Answer) -> list[Detection]:
    """An LLM answer's boxes as written, minus empty and whole-canvas boxes (not clipped, not split)."""
    detections = []
    for obj in answer.objects:
        box = xywh_to_xyxy(obj.box)
        visible_w = min(box[2], 1.0) - max(box[0], 0.0)
        visible_h = min(box[3], 1.0) - max(box[1], 0.0)
        if obj.box[2] <= 0 or obj.box[3] <= 0 or visible_w <= 0 or visible_h <= 0 or is_full_canvas_box(obj.box):
            continue
        detections.append((obj.phrase, box))
    return detections


def names_object(name: str, noun: str) -> bool:
    """Whether a box labelled ``name`` is an instance of ``noun`` (singular head noun)."""
    return head_noun(name) == noun


def names_coloured_object(name: str, colour: str, noun: str) -> bool:
    return names_object(name, noun) and colour in modifiers(name)


def count_objects(detections: Iterable[Detection], noun: str) -> int:
    """Boxes naming ``noun``; each box counts once, whatever number its phrase says."""
    return sum(1 for name, _ in detections if names_object(name, noun))


def first_box(detections: Iterable[Detection], noun: str) -> XYXY | None:
    return next((box for name, box in detections if names_object(name, noun)), None)


# ----------------------------------------------------------------------------------------
# The published rules
# ----------------------------------------------------------------------------------------


def negation_rule(detections: Sequence[Detection], noun: str) -> RuleResult:
    found = count_objects(detections, noun)
    return RuleResult(passed=found == 0, detail=f"{found} box(es) name the excluded {noun!r}")


def numeracy_rule(detections: Sequence[Detection], noun: str, count: int) -> RuleResult:
    found = count_objects(detections, noun)
    return RuleResult(passed=found == count, detail=f"{found} box(es) name {noun!r}, expected exactly {count}")


def attribution_rule(detections: Sequence[Detection], pairs: Sequence[tuple[str, str]]) -> RuleResult:
    missing = [f"{c} {n}" for c, n in pairs if not any(names_coloured_object(name, c, n) for name, _ in detections)]
    return RuleResult(passed=not missing, detail=f"no box names {', '.join(missing)}" if missing else "every pair is named")


def spatial_rule(detections: Sequence[Detection], first: str, second: str, relation: Relation) -> RuleResult:
    """``first`` is on the ``relation`` side of ``second``: box centres ordered in x (left/right) or y (top/bottom)."""
    box_a, box_b = first_box(detections, first), first_box(detections, second)
    if box_a is None or box_b is None:
        absent = [n for n, b in ((first, box_a), (second, box_b)) if b is None]
        return RuleResult(passed=False, detail=f"no box names {' or '.join(map(repr, absent))}")
    axis = 0 if relation in ("left", "right") else 1
    centre_a = (box_a[axis] + box_a[axis + 2]) / 2
    centre_b = (box_b[axis] + box_b[axis + 2]) / 2
    passed = centre_a < centre_b if relation in ("left", "top") else centre_a > centre_b
    coord = "x" if axis == 0 else "y"
    return RuleResult(
        passed=passed,
        detail=f"{first} centre {coord}={centre_a * GRID:.0f}, {second} centre {coord}={centre_b * GRID:.0f}; wanted {first} on the {relation}",
    )


def evaluate(spec: BenchmarkSpec, detections: Sequence[Detection]) -> RuleResult:
    """Apply the published rule of ``spec.task``."""
    if spec.task == "negation":
        return negation_rule(detections, spec.objects[0])
    if spec.task == "numeracy":
        return numeracy_rule(detections, spec.objects[0], spec.count or 0)
    if spec.task == "attribution":
        return attribution_rule(detections, list(zip(spec.colours, spec.objects)))
    return spatial_rule(detections, spec.objects[0], spec.objects[1], spec.relation or "left")


# ----------------------------------------------------------------------------------------
# Stricter layout checks (reported separately; not part of the published score)
# ----------------------------------------------------------------------------------------


def strict_checks(detections: Sequence[Detection], max_iou: float = 0.5, min_box_px: int = 32) -> dict[str, bool]:
    """Boxes inside the canvas (as written), no pair overlapping above ``max_iou``, every side >= ``min_box_px``."""
    inside = all(0.0 <= v <= 1.0 for _, box in detections for v in box)
    ious = [box_iou(a[1], b[1]) for i, a in enumerate(detections) for b in detections[i + 1 :]]
    overlap_ok = all(iou <= max_iou for iou in ious)
    size_ok = all(min(box[2] - box[0], box[3] - box[1]) * GRID >= min_box_px for _, box in detections)
    return {"inside_canvas": inside, "overlap": overlap_ok, "min_size": size_ok}
