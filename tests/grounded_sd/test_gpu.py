"""On a CUDA machine: the real SD weights (LMD_TEST_SD_MODEL, a hub id or local directory)
and, always there, the tiny model in fp16. Skipped cleanly without CUDA."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from grounded_sd import LMDOptions, LMDPipeline
from tests.support.builders import box_object, layout_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LAYOUT = layout_data(
    box_object("cat", "a grey cat", (0.05, 0.35, 0.45, 0.95)),
    box_object("ball", "a red ball", (0.55, 0.6, 0.85, 0.9)),
    box_object("lamp", "a lamp", (0.6, 0.05, 0.9, 0.45)),
    background="a realistic living room",
)


def test_tiny_model_in_fp16_on_cuda(tiny_sd_path):
    pipe = LMDPipeline.from_pretrained(tiny_sd_path, device="cuda", dtype="auto")
    assert pipe.dtype == torch.float16
    result = pipe(LAYOUT, seed=1, width=64, height=64, options=LMDOptions.reference(steps=8, loss_threshold=0.0))
    assert np.isfinite(np.asarray(result.image, dtype=np.float32)).all()
    assert all(o.per_box_energy.after_first_step < o.per_box_energy.start for o in result.report.objects)
    again = pipe(LAYOUT, seed=1, width=64, height=64, options=LMDOptions.reference(steps=8, loss_threshold=0.0))
    assert np.abs(np.asarray(result.image, dtype=np.int16) - np.asarray(again.image, dtype=np.int16)).max() <= 2


@pytest.mark.skipif(not os.environ.get("LMD_TEST_SD_MODEL"), reason="set LMD_TEST_SD_MODEL to an SD 1.x/2.x model")
@pytest.mark.parametrize("preset", ["reference", "fast"])
def test_real_model_renders_the_layout(tmp_path, preset):
    pipe = LMDPipeline.from_pretrained(os.environ["LMD_TEST_SD_MODEL"], device="cuda")
    result = pipe(LAYOUT, seed=0, options=getattr(LMDOptions, preset)(energy_checks=True))  # fast skips them by default
    result.save(tmp_path)
    assert result.image.size == (512, 512)
    image = np.asarray(result.image, dtype=np.float32)
    assert np.isfinite(image).all() and image.std() > 10  # not a blank or NaN-black image
    for obj in result.report.objects:
        assert obj.per_box_energy.after_first_step <= obj.per_box_energy.start
        assert obj.mask_box_iou > 0.1


def test_tiny_refiner_in_fp16_on_cuda(tiny_sd_path, tiny_refiner_path):
    from grounded_sd import Refiner, RefinerOptions

    pipe = LMDPipeline.from_pretrained(tiny_sd_path, device="cuda")
    refiner = Refiner.from_pretrained(tiny_refiner_path, device="cuda")
    result = pipe(LAYOUT, seed=1, width=64, height=64, options=LMDOptions.fast(steps=4))
    refined = refiner.refine(result, options=RefinerOptions(steps=10, resolution=128))
    assert refined.image.size == (128, 128) and refined.report.refiner.steps == 3
    assert np.isfinite(np.asarray(refined.image, dtype=np.float32)).all()


@pytest.mark.skipif(
    not (os.environ.get("LMD_TEST_SD_MODEL") and os.environ.get("LMD_TEST_REFINER_MODEL")),
    reason="set LMD_TEST_SD_MODEL and LMD_TEST_REFINER_MODEL (stabilityai/stable-diffusion-xl-refiner-1.0 or a local copy)",
)
def test_real_refiner_finishes_the_image(tmp_path):
    from grounded_sd import Refiner

    pipe = LMDPipeline.from_pretrained(os.environ["LMD_TEST_SD_MODEL"], device="cuda")
    refiner = Refiner.from_pretrained(os.environ["LMD_TEST_REFINER_MODEL"], device="cuda")
    result = refiner.refine(pipe(LAYOUT, seed=0, options=LMDOptions.fast()))
    result.save(tmp_path)
    image = np.asarray(result.image, dtype=np.float32)
    assert result.image.size == (1024, 1024) and np.isfinite(image).all() and image.std() > 10
    assert result.report.refiner.steps == 15
