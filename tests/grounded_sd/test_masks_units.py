"""Exact pixels and messages of the mask code's helpers, and the seeded noise (model-free: part
of the fast set mutation testing runs, docs/mutation.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_sd.compose import object_seed, seeded_noise, step_noise_seed
from grounded_sd.masks import MaskInputError, _box_pixels, _check_image, _grown_box


@pytest.mark.parametrize(
    ("box", "pixels"),
    [
        ((0.0, 0.0, 1.0, 1.0), (0, 0, 64, 48)),
        ((0.25, 0.5, 0.75, 1.0), (16, 24, 48, 48)),
        ((0.1, 0.1, 0.2, 0.2), (6, 4, 13, 10)),  # x0 floors (6.4 -> 6), x1 rounds (12.8 -> 13)
        ((0.5, 0.5, 0.5001, 0.5001), (32, 24, 33, 25)),  # at least one pixel
        ((0.999, 0.999, 1.0, 1.0), (63, 47, 64, 48)),
    ],
)
def test_box_pixels_are_exact(box, pixels):
    assert _box_pixels(box, 64, 48) == pixels


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ((0.5, 0.1, 0.4, 0.2), "0 <= x0 < x1 <= 1"),
        ((0.1, 0.5, 0.2, 0.5), "0 <= x0 < x1 <= 1"),
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


def test_images_must_be_uint8_rgb_and_not_empty():
    assert _check_image(np.zeros((5, 7, 3), np.uint8)) == (5, 7)
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
