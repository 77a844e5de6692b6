"""The reference's box rescale (utils/parse.py:126-226, filter_boxes with scale_boxes=True, max_scale=3):
expected boxes worked out by hand from its rule on the 512 grid, x' = (x - min x0) * s,
y' = y * s then shifted up by what passes the bottom, each of x, y, w, h rounded."""

from __future__ import annotations

import pytest

from layout_planner.layout import Layout
from layout_planner.rescale import BoxRescale, rescale_boxes


def _layout(*boxes_px: tuple[float, float, float, float], warnings: list[str] | None = None) -> Layout:
    """Objects o0, o1... from [x, y, w, h] boxes on the 512 grid."""
    objects = [
        {"id": f"o{i}", "phrase": f"thing {i}", "box": [x / 512, y / 512, (x + w) / 512, (y + h) / 512]}
        for i, (x, y, w, h) in enumerate(boxes_px)
    ]
    return Layout.model_validate({"objects": objects, "background": "a room", "negative": "fog", "warnings": warnings or []})


def _px(layout: Layout) -> list[list[float]]:
    return [[round(v * 512, 6) for v in o.box] for o in layout.objects]


def test_a_layout_spanning_half_the_width_is_scaled_twice_and_shifted_into_the_canvas():
    # x span 64..320 (256: 2x), y span 100..350 (250: 2.048x) -> 2x; bottom 700 passes 512 by 188
    out, done = rescale_boxes(_layout((64, 100, 128, 100), (192, 300, 128, 50)))
    assert done == BoxRescale(scale=2.0, offset=(-0.25, -188 / 512), dropped=[])
    assert _px(out) == [[0, 12, 256, 212], [256, 412, 512, 512]]
    assert (out.background, out.negative, [o.id for o in out.objects]) == ("a room", "fog", ["o0", "o1"])
    assert [str(w) for w in out.warnings] == [
        "rescaled: boxes scaled 2x and moved by (-0.250, -0.367) of the canvas to span it, as the reference does (at most 3x)"
    ]


def test_the_scale_stops_at_three():
    # spans 100 wide (5.12x) and 80 high (6.4x): 3x; the bottom, 390, stays on the canvas
    out, done = rescale_boxes(_layout((100, 50, 40, 40), (160, 70, 40, 60)))
    assert done.scale == 3.0 and done.offset == (-300 / 512, 0.0)
    assert _px(out) == [[0, 150, 120, 270], [180, 210, 300, 390]]
    one, alone = rescale_boxes(_layout((128, 128, 128, 128)))  # 4x would fit
    assert alone.scale == 3.0 and _px(one) == [[0, 128, 384, 512]]
    twice, _ = rescale_boxes(_layout((128, 128, 128, 128)), max_scale=2)
    assert _px(twice) == [[0, 256, 256, 512]]


def test_a_tall_layout_is_scaled_to_the_height_and_moved_up_to_fill_it():
    # y span 100..400 (300: 1.7067x) binds before x span 200..300 (5.12x); the scaled bottom 682.67 moves up 170.67
    out, done = rescale_boxes(_layout((200, 100, 50, 150), (250, 250, 50, 150)))
    assert done.scale == pytest.approx(512 / 300) and done.offset[1] == pytest.approx(-(400 * 512 / 300 - 512) / 512)
    assert _px(out) == [[0, 0, 85, 256], [85, 256, 170, 512]]  # 85.33 rounded: corner and width apart


def test_corner_and_size_are_rounded_apart_as_the_reference_rounds_them():
    # x span 50..300 (2.048x), y span 100..300 (2.56x): B's x 307.2 -> 307 and w 204.8 -> 205 (its edge 512, not round(512.0))
    out, _ = rescale_boxes(_layout((50, 100, 100, 200), (200, 150, 100, 150)))
    assert _px(out) == [[0, 102, 205, 512], [307, 205, 512, 512]]


def test_a_whole_canvas_box_is_dropped_as_background_and_does_not_set_the_span():
    out, done = rescale_boxes(_layout((0, 0, 512, 512), (128, 128, 128, 128), (256, 256, 128, 128), warnings=["scale: kept"]))
    assert [o.id for o in out.objects] == ["o1", "o2"] and done.dropped == ["o0"]
    assert done.scale == 2.0 and _px(out) == [[0, 0, 256, 256], [256, 256, 512, 512]]
    assert [w.tag for w in out.warnings] == ["scale", "dropped", "rescaled"]
    assert "'thing 0' (o0) covers the whole canvas" in out.warnings[1].text


def test_a_layout_already_spanning_the_canvas_is_left_as_it_is():
    layout = _layout((0, 0, 256, 512), (256, 100, 256, 100))
    out, done = rescale_boxes(layout)
    assert done == BoxRescale(scale=1.0, offset=(0.0, 0.0)) and _px(out) == _px(layout) and out.warnings == []


def test_nothing_to_rescale():
    empty = _layout()
    assert rescale_boxes(empty) == (empty, None)
    only_background, done = rescale_boxes(_layout((0, 0, 512, 512)))
    assert done is None and only_background.objects == [] and [w.tag for w in only_background.warnings] == ["dropped"]


def test_a_sliver_at_the_far_edge_keeps_a_pixel_on_the_canvas():
    out, _ = rescale_boxes(_layout((0, 0, 100, 100), (511.8, 0, 0.2, 512)))
    assert _px(out) == [[0, 0, 100, 100], [511, 0, 512, 512]]
