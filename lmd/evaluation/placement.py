"""What the task scores hide: whether each layout object was drawn in its box.

A task rule passes or fails a whole image; it does not say whether the objects it found are
where the layout put them (a numeracy image with three circles in the wrong places passes).
For each object of the reference layout (the stored perfect layout in the shapes world, else
the run's own layout): the detection that names it (its head noun, and its colour when the
phrase gives one) with the highest IoU with its box; a *hit* when that IoU is at least
``HIT_IOU``. Each detection serves one object at most (greedy, best IoU first).

A looser reading, *centred*: a detection naming the object has its centre inside the object's
box (greedy again, nearest to the box's centre first). It counts an object drawn in its box
but smaller or larger than the box, which IoU >= 0.5 does not (ours: the shapes model draws
objects at its own preferred size, docs/shapes.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel

from layout_planner.benchmark import TASKS, names_object
from layout_planner.layout import Layout, box_iou
from layout_planner.words import COLOURS, head_noun, modifiers

HIT_IOU = 0.5


class ObjectPlacement(BaseModel):
    id: str
    phrase: str
    iou: float  # best IoU of a detection naming the object (0.0: none)
    hit: bool
    centred: bool = False  # a detection naming the object has its centre in the object's box


class PlacementSummary(BaseModel):
    objects: int
    hits: int
    hit_rate: float | None
    mean_iou: float | None
    centred: int = 0
    centred_rate: float | None = None


def _names(detection_name: str, phrase: str) -> bool:
    noun = head_noun(phrase)
    colours = [w for w in modifiers(phrase) if w in COLOURS]
    return names_object(detection_name, noun) and all(c in modifiers(detection_name) for c in colours)


def _centre_in(box: Sequence[float], other: Sequence[float]) -> float | None:
    """Distance from ``other``'s centre to ``box``'s centre when it lies inside ``box``, else None."""
    cx, cy = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
    if not (box[0] <= cx <= box[2] and box[1] <= cy <= box[3]):
        return None
    return ((cx - (box[0] + box[2]) / 2) ** 2 + (cy - (box[1] + box[3]) / 2) ** 2) ** 0.5


def _centred(layout: Layout, detections: Sequence[tuple[str, tuple[float, float, float, float]]]) -> set[int]:
    pairs = sorted(
        (d, i, j) for i, obj in enumerate(layout.objects) for j, (name, box) in enumerate(detections)
        if _names(name, obj.phrase) and (d := _centre_in(obj.box, box)) is not None
    )  # fmt: skip
    found: set[int] = set()
    used: set[int] = set()
    for _, i, j in pairs:
        if i not in found and j not in used:
            found.add(i)
            used.add(j)
    return found


def place(layout: Layout, detections: Sequence[tuple[str, tuple[float, float, float, float]]]) -> list[ObjectPlacement]:
    """Each layout object's best-matching detection (one detection per object at most)."""
    pairs = sorted(
        ((box_iou(tuple(obj.box), box), i, j) for i, obj in enumerate(layout.objects) for j, (name, box) in enumerate(detections)
         if _names(name, obj.phrase)),
        reverse=True,
    )  # fmt: skip
    best: dict[int, float] = {}
    used: set[int] = set()
    for iou, i, j in pairs:
        if i in best or j in used or iou <= 0:
            continue
        best[i] = iou
        used.add(j)
    centred = _centred(layout, detections)
    return [
        ObjectPlacement(id=o.id, phrase=o.phrase, iou=round(best.get(i, 0.0), 4), hit=best.get(i, 0.0) >= HIT_IOU, centred=i in centred)
        for i, o in enumerate(layout.objects)
    ]


def summarise_placement(rows: Iterable[tuple[str, list[ObjectPlacement]]]) -> dict[str, PlacementSummary]:
    """Hit rate and mean IoU per task and ``overall``, over objects."""
    rows = list(rows)

    def summary(placements: list[ObjectPlacement]) -> PlacementSummary:
        n = len(placements)
        hits = sum(p.hit for p in placements)
        centred = sum(p.centred for p in placements)
        return PlacementSummary(
            objects=n, hits=hits, hit_rate=round(hits / n, 4) if n else None,
            mean_iou=round(sum(p.iou for p in placements) / n, 4) if n else None,
            centred=centred, centred_rate=round(centred / n, 4) if n else None,
        )

    result = {task: summary([p for t, ps in rows if t == task for p in ps]) for task in TASKS}
    result["overall"] = summary([p for _, ps in rows for p in ps])
    return result


def placement_table(rows: dict[str, dict[str, PlacementSummary]]) -> str:
    """One row per method: objects in their box (IoU >= 0.5) in %, mean IoU in brackets, and
    the objects whose centre lies in their box, in %."""
    columns = [*TASKS, "overall"]
    lines = ["| method | " + " | ".join(columns) + " | centred, overall | objects |", "|---|" + "---|" * len(columns) + "---|---|"]
    for method, summary in rows.items():
        cells = [
            "-" if summary[c].hit_rate is None else f"{100 * summary[c].hit_rate:.1f} ({summary[c].mean_iou:.2f})" for c in columns
        ]
        overall = summary["overall"]
        centred = "-" if overall.centred_rate is None else f"{100 * overall.centred_rate:.1f}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {centred} | {overall.objects} |")
    return "\n".join(lines) + "\n"
