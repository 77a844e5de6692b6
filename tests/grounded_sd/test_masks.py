"""Object masks (docs/method.md §2.4): attention, SAM refinement on a tiny real SAM, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from grounded_sd.masks import MaskInputError, MaskOptions, MaskResult, object_mask
from tests.support.tiny_sam import build_tiny_sam, set_predicted_ious

torch.set_num_threads(1)

SIZE = 64
BOX = (0.25, 0.25, 0.75, 0.875)  # pixels x 16..48, y 16..56
BOX_PIXELS = np.zeros((SIZE, SIZE), dtype=bool)
BOX_PIXELS[16:56, 16:48] = True


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _blob_attention(center: tuple[int, int] = (9, 7), size: int = 16) -> np.ndarray:
    """A 16x16 attention map with a gaussian blob at ``center`` (row, col) plus a weaker one outside the box."""
    rows, cols = np.mgrid[0:size, 0:size]
    blob = np.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / 4.0)
    outside = 0.5 * np.exp(-((rows - 1) ** 2 + (cols - 1) ** 2) / 2.0)
    return (blob + outside).astype(np.float32)


def _candidates(predictor: SamPredictor, result: MaskResult, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """Ask the same predictor directly with the prompt the mask code used."""
    predictor.set_image(_image())
    if prompt == "box":
        masks, scores, _ = predictor.predict(box=np.array(result.sam_prompt, dtype=np.float32), multimask_output=True)
    else:
        masks, scores, _ = predictor.predict(
            point_coords=np.array([result.sam_prompt], dtype=np.float32), point_labels=np.array([1]), multimask_output=True
        )
    return masks, scores


def test_attention_mask_without_sam_is_thresholded_inside_the_box():
    result = object_mask(_image(), _blob_attention(), BOX, predictor=None)
    assert result.source == "attention"
    assert "SAM not configured" in result.detail
    assert result.mask.dtype == bool and result.mask.shape == (SIZE, SIZE)
    assert result.mask.any()
    assert not (result.mask & ~BOX_PIXELS).any(), "the coarse mask leaves the box"
    # the blob at attention (9, 7) sits near image pixel (38, 30); the box corner far from it is off
    assert result.mask[38, 30] and not result.mask[54, 46]
    # a stricter threshold gives a strictly smaller mask
    strict = object_mask(_image(), _blob_attention(), BOX, predictor=None, options=MaskOptions(attention_threshold=0.8))
    assert strict.mask.sum() < result.mask.sum() and not (strict.mask & ~result.mask).any()


def test_smoothing_spreads_a_single_hot_cell():
    attention = np.zeros((16, 16), dtype=np.float32)
    attention[8, 8] = 1.0
    sharp = object_mask(_image(), attention, BOX, predictor=None, options=MaskOptions(smooth_sigma=0.0))
    smooth = object_mask(_image(), attention, BOX, predictor=None, options=MaskOptions(smooth_sigma=1.5))
    assert sharp.source == smooth.source == "attention"
    assert smooth.mask.sum() > sharp.mask.sum()


@pytest.mark.parametrize(
    "attention, reason",
    [
        (np.zeros((16, 16), np.float32), "empty"),
        (np.full((16, 16), np.nan, np.float32), "empty or not finite"),
        (np.full((8, 8), -np.inf, np.float32), "empty or not finite"),
        (np.zeros((2, 3, 4), np.float32), "shape"),
        (np.zeros((0, 4), np.float32), "shape"),
    ],
)
def test_bad_attention_falls_back_to_the_box(attention, reason):
    result = object_mask(_image(), attention, BOX, predictor=None)
    assert result.source == "box"
    assert reason in result.detail
    assert np.array_equal(result.mask, BOX_PIXELS)


def test_attention_outside_the_box_only_falls_back_to_the_box():
    attention = np.zeros((16, 16), np.float32)
    attention[0:2, 0:2] = 1.0
    result = object_mask(_image(), attention, BOX, predictor=None, options=MaskOptions(smooth_sigma=0.0))
    assert result.source == "box" and "zero inside the box" in result.detail


def test_nan_cells_are_ignored_not_fatal():
    attention = _blob_attention()
    attention[0, :] = np.nan
    attention[1, 1] = np.inf
    result = object_mask(_image(), attention, BOX, predictor=None)
    assert result.source == "attention" and result.mask[38, 30]


@pytest.mark.parametrize("prompt", ["point", "box"])
def test_sam_takes_the_largest_acceptable_candidate(prompt):
    sam = build_tiny_sam()
    predictor = SamPredictor(sam)
    options = MaskOptions(sam_min_coarse_iou=0.0, sam_box_margin=None)

    set_predicted_ious(sam, (0.95, 0.95, 0.95))
    result = object_mask(_image(), _blob_attention(), BOX, predictor=predictor, prompt=prompt, options=options)
    masks, scores = _candidates(predictor, result, prompt)
    np.testing.assert_allclose(scores, 0.95, atol=1e-6)
    areas = masks.reshape(3, -1).sum(1)
    assert len(set(areas.tolist())) == 3 and areas.min() > 0, f"tiny SAM gave degenerate candidates {areas}"
    largest, second = np.argsort(areas)[::-1][:2]
    assert result.source == "sam", result.detail
    assert np.array_equal(result.mask, masks[largest])
    assert f"sam candidate {largest}" in result.detail
    assert [c.rejected for c in result.candidates] == [None, None, None]
    if prompt == "box":
        assert result.sam_prompt == (16, 16, 48, 56)
    else:
        x, y = result.sam_prompt
        assert BOX_PIXELS[y, x], "the click lies outside the box"

    # SAM doubting the largest candidate hands the choice to the next largest
    ious = [0.95, 0.95, 0.95]
    ious[largest] = 0.5
    set_predicted_ious(sam, tuple(ious))
    result = object_mask(_image(), _blob_attention(), BOX, predictor=predictor, prompt=prompt, options=options)
    assert result.source == "sam"
    assert np.array_equal(result.mask, masks[second])
    assert "predicted IoU 0.50 < 0.85" in result.candidates[largest].rejected


def test_sam_candidates_that_disagree_with_the_attention_are_rejected():
    sam = build_tiny_sam()
    set_predicted_ious(sam, (0.9, 0.9, 0.9))
    predictor = SamPredictor(sam)
    loose = object_mask(
        _image(), _blob_attention(), BOX, predictor=predictor, prompt="point", options=MaskOptions(sam_min_coarse_iou=0.0)
    )
    coarse_ious = sorted({round(c.coarse_iou, 6) for c in loose.candidates})
    assert len(coarse_ious) == 3, loose.candidates
    # a threshold between the two best IoUs leaves exactly the best-agreeing candidate
    threshold = (coarse_ious[1] + coarse_ious[2]) / 2
    strict = object_mask(
        _image(), _blob_attention(), BOX, predictor=predictor, prompt="point", options=MaskOptions(sam_min_coarse_iou=threshold)
    )
    best = max(loose.candidates, key=lambda c: c.coarse_iou)
    assert strict.source == "sam"
    assert f"sam candidate {best.index}" in strict.detail
    assert [c.rejected is None for c in strict.candidates] == [c.index == best.index for c in strict.candidates]
    assert all("IoU with coarse" in c.rejected for c in strict.candidates if c.index != best.index)


def test_sam_mask_is_cut_to_the_grown_box():
    sam = build_tiny_sam()
    set_predicted_ious(sam, (0.95, 0.95, 0.95))
    options = MaskOptions(sam_min_coarse_iou=0.0, sam_box_margin=0.0)
    result = object_mask(_image(), _blob_attention(), BOX, predictor=SamPredictor(sam), prompt="box", options=options)
    assert result.source == "sam"
    assert not (result.mask & ~BOX_PIXELS).any()


def test_every_candidate_rejected_falls_back_to_attention():
    sam = build_tiny_sam()
    set_predicted_ious(sam, (0.1, 0.2, 0.3))
    result = object_mask(_image(), _blob_attention(), BOX, predictor=SamPredictor(sam), prompt="point")
    assert result.source == "attention"
    assert "all 3 SAM candidates rejected" in result.detail
    assert len(result.candidates) == 3 and all(c.rejected for c in result.candidates)
    assert np.array_equal(result.mask, object_mask(_image(), _blob_attention(), BOX, predictor=None).mask)


def test_every_candidate_rejected_gives_the_reference_choice_when_asked():
    """models/sam.py:67-86 (select_mask): score = size - max size x (predicted IoU < 0.85) - max size x (coarse
    IoU < 0.25), argmax: the fewest failed checks first, then the largest."""
    sam = build_tiny_sam()
    # candidate 2 passes SAM's own check and fails the coarse one; the largest (1) and 0 fail both
    set_predicted_ious(sam, (0.1, 0.2, 0.9))
    options = MaskOptions(all_rejected="fewest_failed", sam_box_margin=None)
    result = object_mask(_image(), _blob_attention(), BOX, predictor=SamPredictor(sam), prompt="point", options=options)
    masks, scores = _candidates(SamPredictor(sam), result, "point")
    coarse = object_mask(_image(), _blob_attention(), BOX, predictor=None).mask
    sizes = masks.reshape(3, -1).sum(axis=1)
    ious = [np.logical_and(m, coarse).sum() / np.logical_or(m, coarse).sum() for m in masks]
    reference_scores = sizes - (scores < 0.85) * sizes.max() - (np.array(ious) < 0.25) * sizes.max()
    chosen = int(np.argmax(reference_scores))
    assert all(c.rejected for c in result.candidates) and chosen == 2 != int(np.argmax(sizes))
    assert result.source == "sam" and np.array_equal(result.mask, masks[chosen])
    assert f"sam candidate {chosen} " in result.detail and "every candidate failed a check, this one the fewest" in result.detail
    # with the same number of failed checks (SAM's own, coarse check off) the largest wins
    set_predicted_ious(sam, (0.1, 0.2, 0.3))
    loose = object_mask(
        _image(), _blob_attention(), BOX, predictor=SamPredictor(sam), prompt="point",
        options=options.model_copy(update={"sam_min_coarse_iou": 0.0}),
    )
    assert np.array_equal(loose.mask, masks[int(np.argmax(sizes))])
    assert MaskOptions().all_rejected == "attention"  # ours by default: docs/controller.md, "Differences"


def test_sam_with_empty_attention_clicks_the_box_centre_and_compares_with_the_box():
    sam = build_tiny_sam()
    set_predicted_ious(sam, (0.1, 0.1, 0.1))
    result = object_mask(_image(), np.zeros((16, 16), np.float32), BOX, predictor=SamPredictor(sam), prompt="point")
    assert result.source == "box" and np.array_equal(result.mask, BOX_PIXELS)
    assert result.sam_prompt == (31, 35)
    assert "all 3 SAM candidates rejected" in result.detail


def test_attention_at_another_resolution_and_as_a_tensor():
    attention = torch.from_numpy(np.kron(_blob_attention(), np.ones((2, 2), np.float32)))  # 32x32
    result = object_mask(_image(), attention, BOX, predictor=None)
    assert result.source == "attention" and result.mask[38, 30]


def test_malformed_inputs_raise_typed_errors():
    with pytest.raises(MaskInputError, match="uint8"):
        object_mask(_image().astype(np.float32), _blob_attention(), BOX, predictor=None)
    with pytest.raises(MaskInputError, match=r"\(H, W, 3\)"):
        object_mask(_image()[..., 0], _blob_attention(), BOX, predictor=None)
    with pytest.raises(MaskInputError, match="normalised xyxy"):
        object_mask(_image(), _blob_attention(), (0.5, 0.5, 0.4, 0.9), predictor=None)
    with pytest.raises(MaskInputError, match="normalised xyxy"):
        object_mask(_image(), _blob_attention(), (0.1, 0.1, 1.5, float("nan")), predictor=None)
    with pytest.raises(MaskInputError, match="prompt"):
        object_mask(_image(), _blob_attention(), BOX, predictor=None, prompt="scribble")


def test_box_prompt_candidates_are_judged_against_the_box_not_the_attention():
    """LMD+ (as the reference): SAM was asked about the box, so the IoU that can reject a candidate is with the box."""
    sam = build_tiny_sam()
    set_predicted_ious(sam, (0.95, 0.95, 0.95))
    predictor = SamPredictor(sam)
    options = MaskOptions(sam_min_coarse_iou=0.0, sam_box_margin=None)
    blob = object_mask(_image(), _blob_attention(), BOX, predictor=predictor, prompt="box", options=options)
    other = object_mask(_image(), _blob_attention(center=(12, 10)), BOX, predictor=predictor, prompt="box", options=options)
    masks, _ = _candidates(predictor, blob, "box")
    for candidate, mask in zip(blob.candidates, masks):
        box_iou = (mask & BOX_PIXELS).sum() / (mask | BOX_PIXELS).sum()
        assert candidate.coarse_iou == pytest.approx(box_iou)
    assert [c.coarse_iou for c in blob.candidates] == [c.coarse_iou for c in other.candidates]
    assert "IoU with box" in blob.detail
    # the point prompt (LMD) judges the same kind of answers against the attention instead
    point = object_mask(_image(), _blob_attention(), BOX, predictor=predictor, prompt="point", options=options)
    assert "IoU with coarse" in point.detail


def test_smoothing_is_in_attention_map_pixels_with_the_reference_sigma():
    """One hot cell of a 16x16 map: sigma 1.5 in map pixels (the reference's) covers ~8% of the image, as
    the reference's mask does (21 of 256 cells); smoothing the same map after resizing it to a finer grid
    would cover a fraction of that."""
    attention = np.zeros((16, 16), np.float32)
    attention[8, 8] = 1.0
    whole = (0.0, 0.0, 1.0, 1.0)
    assert MaskOptions().smooth_sigma == 1.5
    mask = object_mask(_image(), attention, whole, predictor=None).mask
    assert 0.07 < mask.mean() < 0.09
    resized = torch.nn.functional.interpolate(torch.from_numpy(attention)[None, None], size=(64, 64), mode="bilinear")[0, 0]
    assert object_mask(_image(), resized.numpy(), whole, predictor=None).mask.mean() < 0.03
