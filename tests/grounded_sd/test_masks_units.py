"""Exact pixels and messages of the mask code's helpers, and the seeded noise (model-free: part
of the fast set mutation testing runs, docs/mutation.md)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from grounded_sd.compose import object_seed, seeded_noise, step_noise_seed
from grounded_sd.masks import (
    MaskOptions,
    MaskInputError,
    SamCheckpointError,
    _attention_heatmap,
    _box_pixels,
    _check_image,
    _check_state_dict,
    _gaussian_blur,
    _grown_box,
    _judge_candidates,
    load_sam_predictor,
    object_mask,
)
from tests.support.tiny_sam import build_tiny_sam, set_predicted_ious


@pytest.mark.parametrize(
    ("box", "pixels"),
    [
        ((0.0, 0.0, 1.0, 1.0), (0, 0, 64, 48)),
        ((0.25, 0.5, 0.75, 1.0), (16, 24, 48, 48)),
        ((0.1, 0.1, 0.2, 0.2), (6, 4, 13, 10)),  # x0 floors (6.4 -> 6), x1 rounds (12.8 -> 13)
        ((0.5, 0.5, 0.5001, 0.5001), (32, 24, 33, 25)),  # at least one pixel
        ((0.999, 0.999, 1.0, 1.0), (63, 47, 64, 48)),
        ((1.0, 1.0, 1.0000005, 1.0000005), (63, 47, 64, 48)),  # a sliver at the far edge keeps the last pixel
    ],
)
def test_box_pixels_are_exact(box, pixels):
    assert _box_pixels(box, 64, 48) == pixels


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ((0.5, 0.1, 0.4, 0.2), "0 <= x0 < x1 <= 1"),
        ((0.1, 0.5, 0.2, 0.5), "0 <= x0 < x1 <= 1"),
        ((0.5, 0.1, 0.5, 0.2), "0 <= x0 < x1 <= 1"),  # zero width
        ((-0.1, 0.0, 0.5, 0.5), "must be normalised xyxy"),
        ((0.0, 0.0, 1.1, 0.5), "must be normalised xyxy"),
        ((0.0, float("nan"), 0.5, 0.5), "must be normalised xyxy"),
        (("a", 0, 1, 1), "box must be four numbers x0, y0, x1, y1, got ('a', 0, 1, 1)"),
        ((0, 1), "box must be four numbers"),
    ],
)
def test_bad_boxes_name_the_rule(box, words):
    with pytest.raises(MaskInputError, match=None) as caught:
        _box_pixels(box, 64, 64)
    assert words in str(caught.value)


def test_grown_box_grows_each_side_by_the_margin_and_stops_at_the_edges():
    region = _grown_box((0.25, 0.25, 0.75, 0.5), 64, 64, 0.25)  # 0.5 wide, 0.25 tall: +0.125 and +0.0625
    rows, cols = np.nonzero(region)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (8, 56, 12, 36)
    edge = _grown_box((0.0, 0.5, 0.5, 1.0), 64, 64, 0.5)
    rows, cols = np.nonzero(edge)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (0, 48, 16, 64)
    assert _grown_box((0.25, 0.25, 0.75, 0.75), 64, 64, 0.0).sum() == 32 * 32
    far = _grown_box((0.5, 0.5, 1.0, 1.0), 64, 64, 0.1)  # the right and bottom edges stop at the image too
    rows, cols = np.nonzero(far)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (28, 64, 28, 64)


def test_images_must_be_uint8_rgb_and_not_empty():
    assert _check_image(np.zeros((5, 7, 3), np.uint8)) == (5, 7)
    assert _check_image(np.zeros((1, 7, 3), np.uint8)) == (1, 7)  # one row or column is an image
    assert _check_image(np.zeros((5, 1, 3), np.uint8)) == (5, 1)
    for bad, words in [
        (np.zeros((5, 7), np.uint8), "shape (5, 7) of uint8"),
        (np.zeros((5, 7, 4), np.uint8), "shape (5, 7, 4)"),
        (np.zeros((5, 7, 3), np.float32), "of float32"),
        ([[1, 2, 3]], "shape None of list"),
        (np.zeros((0, 7, 3), np.uint8), "image is empty: shape (0, 7, 3)"),
        (np.zeros((5, 0, 3), np.uint8), "image is empty"),
    ]:
        with pytest.raises(MaskInputError) as caught:
            _check_image(bad)
        assert words in str(caught.value)
        assert "image is empty" in words or "must be an (H, W, 3) uint8 array" in str(caught.value)


def test_seeded_noise_is_the_cpu_normal_of_its_seed_on_any_device_and_dtype():
    expected = torch.randn((2, 3), generator=torch.Generator("cpu").manual_seed(11), dtype=torch.float32)
    got = seeded_noise((2, 3), 11, "cpu", torch.float64)
    assert got.dtype == torch.float64 and got.shape == (2, 3) and torch.allclose(got, expected.double())
    assert not torch.equal(seeded_noise((2, 3), 12, "cpu", torch.float32), expected)


def test_step_noise_seeds_differ_per_key_and_from_the_object_seed():
    seeds = {step_noise_seed(7, key) for key in ("", "cat", "dog")}
    assert len(seeds) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert step_noise_seed(7, "cat") == step_noise_seed(7, "cat") != step_noise_seed(8, "cat")
    assert step_noise_seed(7, "cat") != object_seed(7, "cat")
    assert step_noise_seed(7, "cat") == 0x7FFFFFFFFFFFFFFF & int.from_bytes(
        __import__("hashlib").sha256(b"lmd-step-noise:7:cat").digest()[:8], "big"
    )


# --- SAM checkpoint checks: every problem is named in the message -------------------------------

_EXPECTED = {
    "a.weight": torch.zeros(2, 2),
    "b.weight": torch.zeros(3),
    "c.weight": torch.zeros(4),
    "image_encoder.pos_embed": torch.zeros(1, 2, 2, 768),  # the vit_b encoder's width
}


def _problems(state_dict: dict[str, torch.Tensor], model_type: str = "vit_b") -> str:
    with pytest.raises(SamCheckpointError) as caught:
        _check_state_dict(state_dict, _EXPECTED, Path("ckpt/sam.pth"), model_type)
    message = str(caught.value)
    assert message.startswith(f"SAM checkpoint {Path('ckpt/sam.pth')} does not fit model type {model_type}: ")
    return message.split(": ", 1)[1]


def test_state_dict_check_names_each_kind_of_problem():
    full = dict(_EXPECTED)
    _check_state_dict(full, _EXPECTED, Path("sam.pth"), "vit_b")  # a fitting checkpoint passes
    missing = {k: v for k, v in full.items() if k not in ("b.weight", "c.weight")}
    assert _problems(missing) == "2 missing keys (first: b.weight)"
    unexpected = {**full, "z.extra": torch.zeros(1), "y.extra": torch.zeros(1)}
    assert _problems(unexpected) == "2 unexpected keys (first: y.extra)"
    mismatched = {**full, "a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(5)}
    assert _problems(mismatched) == "2 shape mismatches (first: a.weight (2, 3) != (2, 2))"
    everything = {**mismatched, "y.extra": torch.zeros(1)}
    del everything["c.weight"]
    assert _problems(everything) == (
        "1 missing keys (first: c.weight); 1 unexpected keys (first: y.extra); "
        "2 shape mismatches (first: a.weight (2, 3) != (2, 2))"
    )


def test_state_dict_check_guesses_the_type_only_from_another_encoder_width():
    wide = {**_EXPECTED, "image_encoder.pos_embed": torch.zeros(1, 2, 2, 1280)}
    assert _problems(wide).endswith("(first: image_encoder.pos_embed (1, 2, 2, 1280) != (1, 2, 2, 768)); it looks like a vit_h checkpoint")
    # the right width (the problem is elsewhere), an unknown width, or no encoder at all: no guess
    assert "looks like" not in _problems({**_EXPECTED, "y.extra": torch.zeros(1)})
    assert "looks like" not in _problems({**_EXPECTED, "image_encoder.pos_embed": torch.zeros(1, 2, 2, 5)})
    without = {k: v for k, v in _EXPECTED.items() if k != "image_encoder.pos_embed"}
    assert _problems(without) == "1 missing keys (first: image_encoder.pos_embed)"


def test_loader_messages_name_the_problem(tmp_path: Path):
    path = tmp_path / "sam.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(SamCheckpointError) as caught:
        load_sam_predictor(path, "vit_q")
    assert str(caught.value) == "unknown SAM model type 'vit_q'; choose one of vit_h, vit_l, vit_b"
    with pytest.raises(SamCheckpointError) as caught:
        load_sam_predictor(path, "vit_b", device="not-a-device")
    assert str(caught.value).startswith("invalid device 'not-a-device' for SAM: ")
    with pytest.raises(SamCheckpointError) as caught:
        load_sam_predictor(path, "vit_b")
    assert re.match(rf"cannot read SAM checkpoint {re.escape(str(path))}: \w+Error: ", str(caught.value))
    torch.save({"pos_embed": 3}, path)  # loads, but holds no tensors
    with pytest.raises(SamCheckpointError) as caught:
        load_sam_predictor(path, "vit_b")
    assert str(caught.value) == f"SAM checkpoint {path} does not hold a state dict of tensors"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 2, 2, 1280)}, path)
    with pytest.raises(SamCheckpointError) as caught:
        load_sam_predictor(path, "vit_b")
    assert str(caught.value).startswith(f"SAM checkpoint {path} does not fit model type vit_b: ")
    assert str(caught.value).endswith("it looks like a vit_h checkpoint")


# --- attention heat map and its blur, on hand-computed maps -------------------------------------


def _impulse(size: int) -> torch.Tensor:
    grid = torch.zeros(1, 1, size, size)
    grid[0, 0, size // 2, size // 2] = 1.0
    return grid


@pytest.mark.parametrize(("sigma", "radius"), [(0.25, 1), (1.0, 3), (2.0, 6)])
def test_blur_kernel_reaches_three_sigma_and_at_least_one_cell(sigma, radius):
    row = _gaussian_blur(_impulse(19), sigma)[0, 0, 9]
    assert row[9 + radius] > 0 and row[9 - radius] > 0
    assert row[9 + radius + 1] == 0 and row[9 - radius - 1] == 0


def test_blur_keeps_a_uniform_map_uniform_up_to_the_borders():
    grid = torch.full((1, 1, 6, 5), 2.0)
    assert torch.allclose(_gaussian_blur(grid, 1.5), grid)


def test_heatmap_is_the_blurred_map_scaled_to_its_peak():
    attention = np.zeros((5, 5), np.float32)
    attention[2, 2] = 0.01  # a weak map still peaks at 1
    heat, problem = _attention_heatmap(attention, 5, 5, sigma=0.5)
    assert problem == ""
    # separable gaussian with sigma 0.5: one cell away is exp(-2) of the peak, diagonally exp(-4)
    assert heat[2, 2] == pytest.approx(1.0)
    assert heat[2, 3] == pytest.approx(np.exp(-2.0), rel=1e-5) and heat[1, 2] == pytest.approx(np.exp(-2.0), rel=1e-5)
    assert heat[3, 3] == pytest.approx(np.exp(-4.0), rel=1e-5)


def test_heatmap_cells_are_centred_on_their_pixel_blocks():
    """Bilinear upsampling with half-pixel centres: a 2x2 map on 4x4 pixels puts each cell's value on
    the centre of its 2x2 block and keeps the outer pixels at the edge cells' values."""
    heat, _ = _attention_heatmap(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), 4, 4, sigma=0.0)
    assert heat[0].tolist() == pytest.approx([1.0, 0.75, 0.25, 0.0])


def test_heatmap_ignores_negative_cells_and_names_unusable_maps():
    heat, problem = _attention_heatmap(np.array([[1.0, -3.0], [-1.0, 0.5]], np.float32), 2, 2, sigma=0.0)
    assert problem == "" and heat.min() == 0.0 and heat.tolist() == [[1.0, 0.0], [0.0, 0.5]]
    assert _attention_heatmap(np.zeros((2, 3, 4)), 4, 4, 0.0) == (None, "attention has shape (2, 3, 4), expected (h, w)")
    assert _attention_heatmap(np.full((3, 3), -1.0), 4, 4, 0.0) == (None, "attention is empty or not finite")


# --- judging SAM's candidates and the masks object_mask falls back to ---------------------------


def test_candidates_at_the_thresholds_are_accepted_and_empty_ones_named():
    reference = np.zeros((4, 4), bool)
    reference[0, 0] = True
    quarter = np.zeros((4, 4), bool)
    quarter[0, :4] = True  # IoU with the reference exactly 1/4
    masks = np.stack([quarter, quarter, np.zeros((4, 4), bool)])
    options = MaskOptions(sam_min_predicted_iou=0.85, sam_min_coarse_iou=0.25)
    judged = _judge_candidates(masks, np.array([0.85, 0.84, 0.99]), reference, "coarse", options)
    assert [c.rejected for c in judged] == [None, "predicted IoU 0.84 < 0.85", "empty"]
    assert judged[0].coarse_iou == 0.25 and judged[0].area == 0.25
    nothing = _judge_candidates(masks[2:], np.array([0.99]), np.zeros((4, 4), bool), "box", options)
    assert nothing[0].coarse_iou == 0.0 and nothing[0].rejected == "empty"


def test_coarse_mask_is_a_fraction_of_the_peak_inside_the_box_inclusive():
    """Image and attention both 4x4 (no resizing), no smoothing: the strongest cell lies outside the
    box, so the threshold is half of the box's own peak (0.5), and a cell exactly at it is kept."""
    attention = np.array(
        [[9.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.25, 0.0], [0.0, 0.1, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32
    )
    options = MaskOptions(attention_threshold=0.5, smooth_sigma=0.0)
    result = object_mask(np.zeros((4, 4, 3), np.uint8), attention, (0.25, 0.25, 0.75, 0.75), predictor=None, options=options)
    assert result.source == "attention"
    assert result.mask.tolist() == [
        [False, False, False, False], [False, True, True, False], [False, False, False, False], [False] * 4
    ]


def test_zero_attention_in_the_box_falls_back_to_the_box_and_says_why():
    attention = np.zeros((4, 4), np.float32)
    attention[0, 0] = 1.0
    options = MaskOptions(smooth_sigma=0.0)
    result = object_mask(np.zeros((4, 4, 3), np.uint8), attention, (0.5, 0.5, 1.0, 1.0), predictor=None, options=options)
    assert result.source == "box" and result.mask.dtype == bool
    assert result.mask.tolist() == [[False] * 4, [False] * 4, [False, False, True, True], [False, False, True, True]]
    assert result.detail == "the layout box (attention is zero inside the box); SAM not configured"


def test_without_attention_sam_is_clicked_on_the_middle_pixel_of_the_box():
    """Pixels x 16..48 and y 16..56 (33 and 41 pixels): the middle ones are x 32 and y 36."""
    sam = build_tiny_sam()
    set_predicted_ious(sam, (0.1, 0.2, 0.3))
    box = (0.25, 0.25, 49 / 64, 57 / 64)
    image = np.zeros((64, 64, 3), np.uint8)
    result = object_mask(image, np.zeros((16, 16), np.float32), box, predictor=SamPredictor(sam))
    assert result.sam_prompt == (32, 36)
    reasons = "; ".join(f"{c.index}: {c.rejected}" for c in result.candidates)
    assert reasons.startswith("0: predicted IoU ") and "; 1: predicted IoU" in reasons
    assert result.detail == f"the layout box (attention is empty or not finite); all 3 SAM candidates rejected ({reasons})"


def test_a_sam_that_fails_at_run_time_leaves_the_fallback_and_says_why():
    """A real failure of a real (tiny) SAM: weights in float64 against SAM's float32 input."""
    sam = build_tiny_sam().to(torch.float64)
    attention = np.zeros((16, 16), np.float32)
    attention[8, 8] = 1.0
    image = np.zeros((64, 64, 3), np.uint8)
    result = object_mask(image, attention, (0.25, 0.25, 0.75, 0.75), predictor=SamPredictor(sam))
    assert result.source == "attention"
    assert np.array_equal(result.mask, object_mask(image, attention, (0.25, 0.25, 0.75, 0.75), predictor=None).mask)
    assert result.detail.startswith("attention >= 0.25 x its peak inside the box; SAM failed (RuntimeError: ")
    assert result.detail.endswith(")") and "dtype" in result.detail
