"""LoRA adapters on the tiny random SD: they change the image, switch per call on one pipeline
without leaking into the next call, reach the guidance's forwards, and load from kohya's format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_sd import LMDOptions, LMDPipeline
from grounded_sd.lora import LoraChoice, LoraLoadError
from tests.support.builders import box_object, park_layout_data

SIZE = 64
LAYOUT = park_layout_data(box_object("ball", "a blue ball", (0.6, 0.05, 0.85, 0.3)))


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    """A pipeline of its own: the adapters it loads stay in it for the module's tests."""
    torch.set_num_threads(1)
    return LMDPipeline.from_pretrained(tiny_sd_path, device="cpu")


def render(pipe, *loras: LoraChoice):
    return pipe(LAYOUT, seed=5, width=SIZE, height=SIZE, options=LMDOptions.reference(steps=4), loras=loras)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def ink(paths, weight: float = 1.0, name: str = "ink") -> LoraChoice:
    return LoraChoice(name=name, path=str(paths["ink"]), weight=weight)


def paper(paths, weight: float = 1.0) -> LoraChoice:
    return LoraChoice(name="paper", path=str(paths["paper"]), weight=weight)


def test_an_adapter_changes_the_image_and_the_guidance_and_is_recorded(pipe, tiny_loras):
    plain = render(pipe)
    styled = render(pipe, ink(tiny_loras))
    assert np.abs(pixels(plain) - pixels(styled)).max() > 10
    # the per-box pass's guidance reads the attention of a forward that runs through the adapter
    assert styled.report.objects[0].per_box_energy.start != plain.report.objects[0].per_box_energy.start
    assert [lora.model_dump() for lora in styled.report.loras] == [{"name": "ink", "weight": 1.0}]
    assert plain.report.loras == []
    assert [lora.model_dump() for lora in styled.parameters().loras] == [{"name": "ink", "weight": 1.0}]


def test_switching_adapters_on_one_pipeline_never_leaks(pipe, tiny_sd_path, tiny_loras):
    fresh = LMDPipeline.from_pretrained(tiny_sd_path, device="cpu")  # never saw an adapter
    plain = pixels(render(fresh))
    render(pipe, ink(tiny_loras))
    assert np.array_equal(pixels(render(pipe)), plain)  # ink disabled again: the plain model's image, to the pixel
    render(pipe, ink(tiny_loras))
    only_paper = pixels(render(pipe, paper(tiny_loras)))
    assert np.array_equal(only_paper, pixels(render(fresh, paper(tiny_loras))))  # no trace of ink
    assert pipe._adapters.loaded.keys() == {"ink", "paper"}  # each file loaded once, kept


def test_weight_zero_is_the_plain_model_and_weights_scale(pipe, tiny_loras):
    plain = pixels(render(pipe))
    assert np.array_equal(pixels(render(pipe, ink(tiny_loras, weight=0.0))), plain)
    half, full = pixels(render(pipe, ink(tiny_loras, weight=0.5))), pixels(render(pipe, ink(tiny_loras)))
    assert not np.array_equal(half, full)


def test_a_kohya_keyed_file_loads_as_the_same_adapter(pipe, tiny_loras):
    diffusers_keys = pixels(render(pipe, ink(tiny_loras)))
    kohya = LoraChoice(name="ink_kohya", path=str(tiny_loras["ink_kohya"]))
    assert np.abs(pixels(render(pipe, kohya)) - diffusers_keys).max() <= 1


def test_bad_files_are_typed_errors_and_leave_the_model_as_it_was(pipe, tiny_loras, tmp_path):
    plain = pixels(render(pipe))
    missing = LoraChoice(name="gone", path=str(tmp_path / "gone.safetensors"))
    with pytest.raises(LoraLoadError, match="'gone': no file at"):
        render(pipe, missing)
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(LoraLoadError, match="not a .safetensors file"):
        render(pipe, LoraChoice(name="old", path=str(pickle)))
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"unet.nowhere.lora.down.weight": torch.zeros(4, 8), "unet.nowhere.lora.up.weight": torch.zeros(8, 4)}, str(wrong))
    with pytest.raises(LoraLoadError, match="'wrong' cannot be loaded"):
        render(pipe, LoraChoice(name="wrong", path=str(wrong)))
    assert np.array_equal(pixels(render(pipe)), plain)
