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
