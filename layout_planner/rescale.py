"""The reference's box rescale: stretch a layout's boxes to span the canvas before generation.

The published LMD (TonyLianLong/LLM-groundedDiffusion, ``utils/parse.py:126-226``,
``filter_boxes(gen_boxes, scale_boxes=True, max_scale=3)``, called at ``generate.py:292`` with
scale_boxes on unless ``--no-scale-boxes-default``) moves the boxes left to the canvas's edge
and scales them about the top-left corner by ``min(W / span_w, H / span_h, 3)``, then shifts
them up where the scaled boxes would pass the canvas's bottom. LLM layouts often crowd into a
part of the canvas; scaled, each object gets more attention cells. It is stage 2's choice
(``LMDOptions.rescale_boxes``, on under the ``reference`` preset), applied to the layout at the
start of generation; the layout keeps a ``rescaled`` warning that names the scale and shift.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from layout_planner.layout import GRID, Layout, LayoutObject, LayoutWarning, bounded_warnings, is_full_canvas_box

MAX_SCALE = 3.0
"""The reference's ``max_scale``: boxes grow at most 3x."""


class BoxRescale(BaseModel):
    """What :func:`rescale_boxes` did: each kept box's ``x -> scale * x + offset[0]`` and
    ``y -> scale * y + offset[1]`` in canvas fractions (before rounding to the grid)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float
    offset: tuple[float, float] = Field(description="(dx, dy) in canvas fractions, added after scaling")
    dropped: list[str] = Field(default_factory=list, description="ids of objects dropped as background (whole-canvas boxes)")


def rescale_boxes(layout: Layout, *, max_scale: float = MAX_SCALE, grid: int = GRID) -> tuple[Layout, BoxRescale | None]:
    """``layout`` with its boxes scaled and shifted by the reference's rule, and what was done;
    ``(layout, None)`` when it has no objects. Whole-canvas boxes are dropped first, as the
    reference's ``ignore_background`` does (the planner's repair already drops them; a client's
    layout may hold one). The result is rounded to ``grid`` pixels, corner and size apart, as the
    reference's ``int(np.round(...))`` of each of x, y, w, h."""
    warnings = list(layout.warnings)
    kept, dropped = [], []
    for obj in layout.objects:
        x0, y0, x1, y1 = (v * grid for v in obj.box)
        if is_full_canvas_box((x0, y0, x1 - x0, y1 - y0), grid):
            dropped.append(obj.id)
            warnings.append(LayoutWarning(tag="dropped", text=f"{obj.phrase!r} ({obj.id}) covers the whole canvas: the background, not an object (box rescale)"))
        else:
            kept.append(obj)
    if not kept:
        return (_with(layout, [], warnings) if dropped else layout), None
    left = min(o.box[0] for o in kept) * grid
    right = max(o.box[2] for o in kept) * grid
    top = min(o.box[1] for o in kept) * grid
    bottom = max(o.box[3] for o in kept) * grid
    scale = min(grid / (right - left), grid / (bottom - top), max_scale)
    # the reference's bbox_y_offset: up by what passes the bottom (its push down from above needs a box
    # above the canvas, which a Layout never holds)
    dy = min(0.0, grid - bottom * scale)
    objects = [LayoutObject(id=o.id, phrase=o.phrase, box=_moved(o.box, scale, left, dy, grid)) for o in kept]
    done = BoxRescale(scale=scale, offset=(-left * scale / grid, dy / grid), dropped=dropped)
    if any(new.box != old.box for new, old in zip(objects, kept)):
        warnings.append(LayoutWarning(
            tag="rescaled",
            text=f"boxes scaled {scale:.3g}x and moved by ({done.offset[0]:+.3f}, {done.offset[1]:+.3f}) of the canvas to span it, as the reference does (at most {max_scale:g}x)",
        ))
    return _with(layout, objects, warnings), done


def _with(layout: Layout, objects: list[LayoutObject], warnings: list[LayoutWarning]) -> Layout:
    return Layout(objects=objects, background=layout.background, negative=layout.negative, warnings=bounded_warnings(warnings))


def _moved(box: tuple[float, float, float, float], scale: float, left: float, dy: float, grid: int) -> tuple[float, float, float, float]:
    """One normalised box through the rule, rounded on the grid as the reference rounds it."""
    x, y = (box[0] * grid - left) * scale, box[1] * grid * scale + dy
    w, h = (box[2] - box[0]) * grid * scale, (box[3] - box[1]) * grid * scale
    # y >= 0 but for float noise, which rounds away: top * scale + dy = grid - span_h * scale >= 0
    px, py = min(grid - 1, round(x)), min(grid - 1, round(y))  # a sliver at the far edge keeps a pixel
    pw, ph = max(1, round(w)), max(1, round(h))
    return (px / grid, py / grid, min(grid, px + pw) / grid, min(grid, py + ph) / grid)
