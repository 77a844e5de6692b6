"""The reference's per-box placement on the tiny SD: objects generated centred, then their
latents, masks and attention moved to their boxes (lmd); LMD+ generates in place."""

from __future__ import annotations

import pytest
import torch

from grounded_sd import LMDOptions
from grounded_sd.compose import centred_box

LAYOUT = {
    "objects": [
        {"id": "cat", "phrase": "a red cat", "box": [0.05, 0.1, 0.45, 0.6]},
        {"id": "dog", "phrase": "a dog", "box": [0.55, 0.45, 0.95, 0.95]},
    ],
    "background": "a realistic park",
}


def test_lmd_generates_objects_centred_then_moves_them_to_their_boxes(tiny_pipeline):
    options = LMDOptions.reference(steps=4, energy_checks=False, rescale_boxes=False)  # the boxes as given
    assert options.per_box_placement == "centred" and LMDOptions.fast().per_box_placement == "centred"
    result = tiny_pipeline(LAYOUT, seed=2, width=64, height=64, options=options)
    moved = {**LAYOUT, "objects": [LAYOUT["objects"][0], {**LAYOUT["objects"][1], "box": [0.05, 0.45, 0.45, 0.95]}]}
    again = tiny_pipeline(moved, seed=2, width=64, height=64, options=options)
    h, w = result.intermediates.per_box_latents.shape[-2:]
    for index, obj in enumerate(result.report.objects):
        assert obj.per_box_box == pytest.approx(centred_box(obj.box))
        cells = result.intermediates.latent_masks[obj.id]
        assert cells.any()
        centre_x = float((cells.float().sum(0) * (torch.arange(w) + 0.5)).sum() / cells.sum()) / w
        centre_y = float((cells.float().sum(1) * (torch.arange(h) + 0.5)).sum() / cells.sum()) / h
        assert centre_x == pytest.approx((obj.box[0] + obj.box[2]) / 2, abs=1 / 16 + 1e-6)  # within half a grid cell
        assert centre_y == pytest.approx((obj.box[1] + obj.box[3]) / 2, abs=1 / 16 + 1e-6)
        # the composition holds the per-box latents moved by the object's shift
        dx, dy = (round(s * n) for s, n in zip(obj.placement_shift, (w, h)))
        owned = result.intermediates.owner == index + 1
        generated = result.intermediates.per_box_latents[1, index]
        expected = torch.roll(generated, shifts=(dy, dx), dims=(-2, -1))
        assert torch.allclose(result.intermediates.composed[1, 0][:, owned], expected[:, owned])
    # the dog moved without changing size: generated centred, its per-box latents do not change
    assert torch.allclose(result.intermediates.per_box_latents[:, 1], again.intermediates.per_box_latents[:, 1], atol=1e-4)
    assert again.report.objects[1].placement_shift[0] < 0 < result.report.objects[1].placement_shift[0]

    in_place = tiny_pipeline(LAYOUT, seed=2, width=64, height=64, options=options.model_copy(update={"per_box_placement": "in_place"}))
    assert [o.per_box_box for o in in_place.report.objects] == [tuple(o["box"]) for o in LAYOUT["objects"]]
    assert all(o.placement_shift == (0.0, 0.0) for o in in_place.report.objects)


def test_lmd_plus_generates_in_place_as_the_reference(tiny_gligen_sd_path):
    from grounded_sd import LMDPipeline

    pipe = LMDPipeline.from_pretrained(tiny_gligen_sd_path, device="cpu")
    result = pipe(LAYOUT, seed=2, variant="lmd_plus", width=64, height=64, options=LMDOptions.reference(steps=3))
    assert result.report.box_rescale.scale == pytest.approx(1 / 0.9)  # LMD+ stretches the boxes too
    assert [o.per_box_box for o in result.report.objects] == [o.box for o in result.layout.objects]


@pytest.mark.parametrize(("overrides", "ratio", "cells"), [({}, 0.01, "corner_size"), ({"box_noise_ratio": 0.1, "box_cells": "edges"}, 0.1, "edges")])
def test_per_box_noise_mixes_in_the_reference_cells_at_the_reference_ratio(tiny_pipeline, overrides, ratio, cells):
    """generation/lmd.py:240 (fg_blending_ratio 0.01) and utils/latents.py:25-35, 138 (the box's cells by
    scale_proportion): each object's initial latent is sqrt(1-r) bg + sqrt(r) fg inside its centred box's cells."""
    from grounded_sd.attention import box_mask
    from grounded_sd.compose import object_seed, seeded_noise

    options = LMDOptions.reference(steps=2, energy_checks=False, rescale_boxes=False, **overrides)
    result = tiny_pipeline(LAYOUT, seed=5, width=64, height=64, options=options)
    initial = result.intermediates.per_box_latents[0]  # (objects, C, 32, 32) on the tiny VAE; DDIM: initial noise sigma 1
    shape = (1, *initial.shape[1:])
    background = seeded_noise(shape, 5, "cpu", torch.float32)[0]
    # the centred cat (0.3, 0.3, 0.7, 0.8) on 32x32: columns round(9.6) = 10 + round(12.8) = 13, rows 10 + 16 (208
    # cells) by the reference's rule; columns int(9.6) = 9 .. round(22.4) = 22, rows 9 .. round(25.6) = 26 (221) by edges
    cat = centred_box(tuple(LAYOUT["objects"][0]["box"]))
    inside = box_mask(cat, 32, 32, rule=cells).bool()
    assert int(inside.sum()) == (208 if cells == "corner_size" else 221)
    foreground = seeded_noise(shape, object_seed(5, "cat"), "cpu", torch.float32)[0]
    expected = torch.where(inside, (1 - ratio) ** 0.5 * background + ratio**0.5 * foreground, background)
    assert torch.allclose(initial[0], expected, atol=1e-6)


HALF = {  # spans x and y 0.25..0.75: the reference stretches it 2x, then moves it up by what passes the bottom
    "objects": [
        {"id": "cat", "phrase": "a cat", "box": [0.25, 0.25, 0.5, 0.5]},
        {"id": "dog", "phrase": "a dog", "box": [0.5, 0.5, 0.75, 0.75]},
    ],
    "background": "a park",
}


def test_reference_stretches_the_boxes_over_the_canvas_and_fast_keeps_them(tiny_pipeline):
    """The reference's scale_boxes default (generate.py:206, 292; utils/parse.py:126-226) under ``reference``:
    the boxes every pass reads, the result's layout, its warning and the report's box_rescale."""
    stretched = tiny_pipeline(HALF, seed=1, width=64, height=64, options=LMDOptions.reference(steps=2, energy_checks=False))
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    assert [o.box for o in stretched.layout.objects] == boxes
    assert [o.box for o in stretched.report.objects] == boxes
    assert [o.per_box_box for o in stretched.report.objects] == [centred_box(b) for b in boxes]
    assert stretched.report.box_rescale.scale == 2.0 and stretched.report.box_rescale.offset == (-0.5, -0.5)
    assert [w.tag for w in stretched.layout.warnings] == ["rescaled"]
    assert stretched.report.options["rescale_boxes"] is True

    kept = tiny_pipeline(HALF, seed=1, width=64, height=64, options=LMDOptions.fast(steps=2))
    assert [o.box for o in kept.report.objects] == [tuple(o["box"]) for o in HALF["objects"]]
    assert kept.report.box_rescale is None and kept.layout.warnings == []
    plain = tiny_pipeline(HALF, seed=1, width=64, height=64, variant="sd", options=LMDOptions.reference(steps=1))
    assert plain.report.box_rescale is None  # plain SD reads no boxes
