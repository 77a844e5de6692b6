"""The SDXL refiner pass on a tiny random SDXL-refiner-shaped model (real diffusers img2img code)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grounded_sd import GenerationCanceled, LMDOptions, ModelLoadError
from grounded_sd.refiner import REFINER_NEGATIVE, Refiner, RefinerOptions, refiner_seed

LAYOUT = {"objects": [{"id": "cat", "phrase": "a red cat", "box": [0.1, 0.2, 0.5, 0.9]}], "background": "a park"}


@pytest.fixture(scope="module")
def refiner(tiny_refiner_path) -> Refiner:
    torch.set_num_threads(1)
    return Refiner.from_pretrained(tiny_refiner_path, device="cpu")


@pytest.fixture(scope="module")
def generated(tiny_pipeline):
    return tiny_pipeline(LAYOUT, seed=3, width=64, height=64, options=LMDOptions.fast(steps=3))


def _copy(result):
    from dataclasses import replace

    return replace(result, report=result.report.model_copy(deep=True))


def test_refiner_refines_the_final_image_and_reports_it(refiner, generated, tmp_path):
    events = []
    options = RefinerOptions(strength=0.3, steps=10, resolution=96)
    refined = refiner.refine(_copy(generated), options=options, progress=lambda *e: events.append(e))
    assert refiner.pipe.config.requires_aesthetics_score
    assert refined.image.size == (96, 96) and refined.overlay.size == (96, 96)
    assert events == [("refine", step, 3) for step in (1, 2, 3)]  # 30% of 10 steps
    report = refined.report.refiner
    assert report is not None and report.strength == 0.3 and report.steps == 3 and report.seed == refiner_seed(3)
    assert report.negative_prompt.endswith(REFINER_NEGATIVE) and report.width == 96
    assert refined.masks.keys() == generated.masks.keys()
    # same seed, same refined image; the refiner changes the image (not just its size)
    again = refiner.refine(_copy(generated), options=options)
    assert np.array_equal(np.asarray(again.image), np.asarray(refined.image))
    plain = generated.image.resize((96, 96))
    assert np.abs(np.asarray(refined.image, np.int16) - np.asarray(plain, np.int16)).mean() > 1.0
    refined.save(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["refiner"]["strength"] == 0.3
    from grounded_sd.image_parameters import read_parameters

    parameters = read_parameters(tmp_path / "image.png")
    assert parameters.refiner == refiner.name and parameters.refiner_strength == 0.3


def test_refiner_cancels_and_rejects_models_of_other_shapes(refiner, generated, tiny_sd_path, tmp_path):
    with pytest.raises(GenerationCanceled):
        refiner.refine(_copy(generated), options=RefinerOptions(steps=10, resolution=None), should_cancel=lambda: True)
    with pytest.raises(ModelLoadError, match="not found"):
        Refiner.from_pretrained(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ModelLoadError, match="model_index.json|SDXL refiner"):
        Refiner.from_pretrained(tiny_sd_path / "unet", device="cpu")
