"""What the task scores hide: whether each layout object was drawn in its box.

A task rule passes or fails a whole image; it does not say whether the objects it found are
where the layout put them (a numeracy image with three circles in the wrong places passes).
For each object of the reference layout (the stored perfect layout in the shapes world, else
the run's own layout): the detection that names it (its head noun, and its colour when the
phrase gives one) with the highest IoU with its box; a *hit* when that IoU is at least
``HIT_IOU``. Each detection serves one object at most (greedy, best IoU first).
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


class PlacementSummary(BaseModel):
    objects: int
    hits: int
    hit_rate: float | None
    mean_iou: float | None


def _names(detection_name: str, phrase: str) -> bool:
    noun = head_noun(phrase)
    colours = [w for w in modifiers(phrase) if w in COLOURS]
    return names_object(detection_name, noun) and all(c in modifiers(detection_name) for c in colours)


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
    return [
        ObjectPlacement(id=o.id, phrase=o.phrase, iou=round(best.get(i, 0.0), 4), hit=best.get(i, 0.0) >= HIT_IOU)
        for i, o in enumerate(layout.objects)
    ]


def summarise_placement(rows: Iterable[tuple[str, list[ObjectPlacement]]]) -> dict[str, PlacementSummary]:
    """Hit rate and mean IoU per task and ``overall``, over objects."""
    rows = list(rows)

    def summary(placements: list[ObjectPlacement]) -> PlacementSummary:
        n = len(placements)
        hits = sum(p.hit for p in placements)
        return PlacementSummary(
            objects=n, hits=hits, hit_rate=round(hits / n, 4) if n else None,
            mean_iou=round(sum(p.iou for p in placements) / n, 4) if n else None,
        )

    result = {task: summary([p for t, ps in rows if t == task for p in ps]) for task in TASKS}
    result["overall"] = summary([p for _, ps in rows for p in ps])
    return result


def placement_table(rows: dict[str, dict[str, PlacementSummary]]) -> str:
    """One row per method: objects in their box (IoU >= 0.5) in %, mean IoU in brackets."""
    columns = [*TASKS, "overall"]
    lines = ["| method | " + " | ".join(columns) + " | objects |", "|---|" + "---|" * len(columns) + "---|"]
    for method, summary in rows.items():
        cells = [
            "-" if summary[c].hit_rate is None else f"{100 * summary[c].hit_rate:.1f} ({summary[c].mean_iou:.2f})" for c in columns
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {summary['overall'].objects} |")
    return "\n".join(lines) + "\n"
