"""lmd.wiring: settings become the stages' configs the same way in every process."""

from __future__ import annotations

from pathlib import Path

import pytest

from grounded_sd import LMDOptions
from lmd import wiring
from tests.support.builders import plain_settings as _settings


def test_a_bad_setting_names_its_variable(monkeypatch):
    monkeypatch.setenv("LMD_MAX_BATCH", "0")
    with pytest.raises(wiring.SettingsError, match=r"^invalid setting LMD_MAX_BATCH: Input should be greater than or equal to 1$"):
        wiring.load_settings()


def test_the_llm_config_carries_every_llm_setting():
    config = wiring.llm_config(_settings(llm_base_url="http://x/v1", llm_model="m", llm_api_key="k", llm_temperature=0.5,
                                         llm_max_reasks=2, max_prompt_chars=99))
    assert (config.base_url, config.model, config.api_key, config.temperature, config.max_reasks, config.max_prompt_chars) == (
        "http://x/v1", "m", "k", 0.5, 2, 99)


def test_pipeline_arguments_take_the_settings_unless_overridden(tmp_path: Path):
    sam = tmp_path / "sam.pth"
    settings = _settings(sd_model="base", device="cpu", sam_checkpoint=sam, sam_model_type="vit_b")
    assert wiring.pipeline_arguments(settings) == {
        "model": "base", "device": "cpu", "dtype": "auto", "scheduler": "DDIMScheduler",
        "sam_checkpoint": str(sam), "sam_model_type": "vit_b", "single_file_config": None,
    }
    chosen = wiring.pipeline_arguments(settings, model="other", device=None, sam_model_type="vit_l", use_sam=False)
    assert (chosen["model"], chosen["device"], chosen["sam_checkpoint"], chosen["sam_model_type"]) == ("other", "cpu", None, "vit_l")
    with pytest.raises(TypeError, match="unknown pipeline arguments"):
        wiring.pipeline_arguments(settings, steps=3)


def test_render_options_of_a_preset_with_overrides_and_the_max_batch_setting():
    settings = _settings(max_batch=2)
    assert wiring.render_options(settings, "fast", steps=9) == LMDOptions.fast(steps=9, max_batch=2)
    assert wiring.render_options(settings, "reference", max_batch=4, guidance_scale=None) == LMDOptions.reference(max_batch=4)
    assert wiring.render_options(_settings(), "reference").max_batch is None


def test_a_preset_is_looked_up_by_name():
    assert LMDOptions.preset("fast", steps=5) == LMDOptions.fast(steps=5)
    assert LMDOptions.preset("reference") == LMDOptions.reference()
    with pytest.raises(ValueError, match="unknown preset 'turbo'"):
        LMDOptions.preset("turbo")
