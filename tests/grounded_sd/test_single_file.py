"""Single-file checkpoints: the kind read from the keys, pickles that hold more than tensors
refused before they run, and one-line errors naming what is missing (the configs of the kind,
offline). Files of tiny real models that load are in test_single_file_load.py."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
from safetensors.torch import save_file

from grounded_sd import LMDPipeline, ModelLoadError
from grounded_sd.preflight import check_variant
from grounded_sd.errors import VariantUnavailable
from grounded_sd.single_file import model_kind, read_checkpoint
from lmd.cli import main

UNET = "model.diffusion_model."
V1_KEY = UNET + "output_blocks.11.0.skip_connection.weight"
V2_KEY = UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"


def original_layout(path, cross_attention_width: int):
    """A file with the original layout's telling keys (tiny tensors): what the kind is read from."""
    save_file({V1_KEY: torch.zeros(4, 8, 1, 1), V2_KEY: torch.zeros(8, cross_attention_width)}, str(path))
    return path


def test_the_kind_is_read_from_the_keys(tmp_path):
    assert model_kind(read_checkpoint(original_layout(tmp_path / "a.safetensors", 768)), "a") == "v1"
    assert model_kind(read_checkpoint(original_layout(tmp_path / "b.safetensors", 1024)), "b") == "v2"
    xl_clip, xl_open_clip = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
    for name, encoder_keys, kind in (
        ("xl", [xl_open_clip + "transformer.resblocks.9.mlp.c_proj.bias"], "xl_base"),  # diffusers' own rule
        ("small-xl", [xl_clip + "final_layer_norm.bias", xl_open_clip + "ln_final.bias"], "xl_base"),  # both base encoders
        ("small-refiner", ["conditioner.embedders.0.model.ln_final.bias"], "xl_refiner"),
        ("half-xl", [xl_clip + "final_layer_norm.bias"], "xl_incomplete"),
    ):
        save_file({V1_KEY: torch.zeros(4, 8, 1, 1), **{key: torch.zeros(8) for key in encoder_keys}}, str(tmp_path / f"{name}.safetensors"))
        if kind == "xl_base":
            assert model_kind(read_checkpoint(tmp_path / f"{name}.safetensors"), name) == kind
            continue
        with pytest.raises(ModelLoadError, match=f"^{name} is a '{kind}' checkpoint; single files load as SD 1.x, SD 2.x or an SDXL base only$"):
            model_kind(read_checkpoint(tmp_path / f"{name}.safetensors"), name)
    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ModelLoadError, match="c is not a Stable Diffusion checkpoint in the original layout"):
        model_kind(read_checkpoint(tmp_path / "c.safetensors"), "c")


def test_a_pickle_holding_more_than_tensors_is_refused_and_a_plain_one_is_read(tmp_path):
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {V1_KEY: torch.zeros(1)}, "when": datetime.datetime(2020, 1, 1)}, hostile)
    with pytest.raises(ModelLoadError, match="hostile.ckpt is refused: a .ckpt is a pickle"):
        read_checkpoint(hostile)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {V1_KEY: torch.zeros(1)}}, plain)
    assert list(read_checkpoint(plain)) == [V1_KEY]  # the wrapper of training checkpoints is unwrapped


@pytest.mark.parametrize(("width", "kind", "repo"), [(768, "SD 1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                                     (1024, "SD 2.x", "stabilityai/stable-diffusion-2-1")])
def test_offline_without_configs_the_error_names_the_kind_the_repository_and_the_setting(tmp_path, monkeypatch, width, kind, repo):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = original_layout(tmp_path / "finetune.safetensors", width)
    with pytest.raises(ModelLoadError) as error:
        LMDPipeline.from_pretrained(path, device="cpu")
    message = str(error.value)
    assert message.startswith(f"finetune.safetensors is a {kind} checkpoint") and len(message.splitlines()) == 1
    assert repo in message and "set LMD_SINGLE_FILE_CONFIG to a local diffusers directory" in message


def test_a_config_directory_that_is_not_a_model_is_named(tmp_path):
    path = original_layout(tmp_path / "finetune.safetensors", 768)
    (tmp_path / "configs").mkdir()
    with pytest.raises(ModelLoadError, match="configs is not a diffusers model directory: missing model_index.json"):
        LMDPipeline.from_pretrained(path, device="cpu", single_file_config=str(tmp_path / "configs"))


def test_an_incomplete_checkpoint_with_configs_at_hand_is_one_line(tmp_path, tiny_sd_path):
    path = original_layout(tmp_path / "partial.safetensors", 768)
    with pytest.raises(ModelLoadError) as error:
        LMDPipeline.from_pretrained(path, device="cpu", single_file_config=str(tiny_sd_path))
    assert str(error.value).startswith("cannot load partial.safetensors as SD 1.x with the configs of")
    assert len(str(error.value).splitlines()) == 1


def test_lmd_plus_on_a_single_file_is_refused_before_loading(tmp_path):
    path = original_layout(tmp_path / "finetune.safetensors", 768)
    with pytest.raises(VariantUnavailable, match="single-file SD checkpoint"):
        check_variant(path, "lmd_plus")


def test_the_cli_refuses_a_hostile_checkpoint_in_one_line(clean_env, capsys):
    hostile = clean_env / "hostile.ckpt"
    torch.save({"state_dict": {}, "when": datetime.datetime(2020, 1, 1)}, hostile)
    layout = clean_env / "layout.json"
    layout.write_text(json.dumps({"objects": [{"id": "cat", "phrase": "a cat", "box": [0.1, 0.1, 0.5, 0.5]}], "background": "a room"}))
    code = main(["generate", "--layout", str(layout), "--model", str(hostile), "--device", "cpu", "--quiet", "--out", str(clean_env / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("lmd generate: error: hostile.ckpt is refused: a .ckpt is a pickle")
