"""Errors of the conditionings' files that name the file, the setting and the fix (issue 21):
prefixed or incomplete checkpoints, a missing encoder directory, and transformers' load report."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from grounded_sd.conditioning.ella import ELLA, ELLAConditioning
from grounded_sd.conditioning.encoders import load_text_encoder
from grounded_sd.conditioning.gluenet import GlueNet
from grounded_sd.conditioning.random_encoders import tiny_ella_config
from grounded_sd.errors import CheckpointMismatch, ConditioningUnavailable


def _prefixed_ella(tiny_conditioning_files, tmp_path, prefix: str):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_conditioning_files["ella"]))
    path = tmp_path / "prefixed.safetensors"
    save_file({prefix + key: value for key, value in state.items()}, str(path))
    return path


def test_a_prefixed_ella_checkpoint_names_the_file_the_setting_and_the_prefix(tiny_conditioning_files, tmp_path):
    path = _prefixed_ella(tiny_conditioning_files, tmp_path, "ella.")
    with pytest.raises(CheckpointMismatch) as sizes_read_from_the_file:
        ELLA.from_file(path, setting="LMD_ELLA_CHECKPOINT")
    with pytest.raises(CheckpointMismatch) as sizes_given:
        ELLA.from_file(path, setting="LMD_ELLA_CHECKPOINT", config=tiny_ella_config(32, 32))
    for message in (str(sizes_read_from_the_file.value), str(sizes_given.value)):
        assert message.startswith(f"{path} (from LMD_ELLA_CHECKPOINT)")
        assert "every key carries the prefix 'ella.'" in message and "without it the keys match" in message
        assert "\n" not in message
    assert "no usable 'connector.latents'" in str(sizes_read_from_the_file.value)  # what was expected
    assert "which expects 37 keys such as" in str(sizes_given.value)


def test_a_prefix_from_data_parallel_is_named_for_gluenet_too(tiny_conditioning_files, tmp_path):
    state = torch.load(tiny_conditioning_files["gluenet_fr"], weights_only=True)
    path = tmp_path / "ddp.ckpt"
    torch.save({"module." + key: value for key, value in state.items()}, path)
    with pytest.raises(CheckpointMismatch, match=r"every key carries the prefix 'module\.' \(saved from torch's DataParallel"):
        GlueNet.from_file(path, setting="LMD_GLUENET_CHECKPOINTS[fr]")
    with pytest.raises(CheckpointMismatch, match=r"\(from LMD_GLUENET_CHECKPOINTS\[fr\]\)"):
        GlueNet.from_file(path, setting="LMD_GLUENET_CHECKPOINTS[fr]")


def test_a_missing_key_names_the_file_the_setting_and_the_key_and_no_prefix(tiny_conditioning_files, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_conditioning_files["ella"]))
    del state["connector.proj_in.bias"]
    path = tmp_path / "incomplete.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatch) as info:
        ELLA.from_file(path, setting="LMD_ELLA_CHECKPOINT")
    message = str(info.value)
    assert message.startswith(f"{path} (from LMD_ELLA_CHECKPOINT) does not match ELLA, which expects 37 keys")
    assert message.endswith("missing key 'connector.proj_in.bias'")  # no prefix explains it: none is claimed


def test_a_missing_encoder_directory_is_said_as_such_not_as_a_bad_repo_id(tiny_conditioning_files, tmp_path):
    for missing in (tmp_path / "no-t5", tmp_path / "deeper" / "no-t5"):
        with pytest.raises(ConditioningUnavailable) as info:
            ELLAConditioning.from_pretrained(tiny_conditioning_files["ella"], missing)
        message = str(info.value)
        assert message.startswith(f"LMD_ELLA_T5: the t5 encoder directory {missing} does not exist")
        assert "Repo id" not in message and "repo_id" not in message
    with pytest.raises(ConditioningUnavailable, match=r"LMD_GLUENET_XLMR: the xlmr encoder directory .* is a file, not a directory"):
        load_text_encoder(tiny_conditioning_files["gluenet_fr"], kind="xlmr", device=torch.device("cpu"),
                          dtype=torch.float32, setting="LMD_GLUENET_XLMR")


@pytest.fixture(scope="module")
def xlmr_with_pooler(tiny_conditioning_files, tmp_path_factory):
    """The tiny XLM-R saved with a pooler, as the released xlm-roberta-large is."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    source = tiny_conditioning_files["xlmr"]
    path = tmp_path_factory.mktemp("xlmr_pooler")
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy(item, path / item.name)
    torch.manual_seed(0)
    XLMRobertaModel(XLMRobertaConfig.from_pretrained(source), add_pooling_layer=True).save_pretrained(path)
    return path


def _load_xlmr(path):
    return load_text_encoder(path, kind="xlmr", device=torch.device("cpu"), dtype=torch.float32, setting="LMD_GLUENET_XLMR")


def test_the_expected_unused_pooler_is_not_reported(xlmr_with_pooler, capfd, caplog):
    with caplog.at_level(logging.WARNING):
        encoder = _load_xlmr(xlmr_with_pooler)
    assert encoder.model.pooler is None  # the pooler was not loaded: GlueNet reads the last hidden state
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.err + printed.out and "pooler" not in printed.err + printed.out
    assert [r for r in caplog.records if "pooler" in r.getMessage() or "LOAD REPORT" in r.getMessage()] == []


def test_unexpected_and_missing_weights_are_said(xlmr_with_pooler, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(xlmr_with_pooler, extra)
    state = load_file(str(extra / "model.safetensors"))
    save_file({**state, "lm_head.bias": torch.zeros(3)}, str(extra / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="grounded_sd.conditioning.encoders"):
        _load_xlmr(extra)
    said = [r.getMessage() for r in caplog.records if r.name == "grounded_sd.conditioning.encoders"]
    assert said == [f"LMD_GLUENET_XLMR: the xlmr text encoder {str(extra)!r} holds 1 weight(s) the encoder does not use "
                    "(first: 'lm_head.bias'); ignored"]

    missing = tmp_path / "missing"
    shutil.copytree(xlmr_with_pooler, missing)
    key = "encoder.layer.1.output.dense.weight"
    save_file({k: v for k, v in state.items() if k != key}, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConditioningUnavailable, match=rf"LMD_GLUENET_XLMR: the xlmr text encoder .* lacks the weight '{key}'"):
        _load_xlmr(missing)
    assert json.loads((missing / "config.json").read_text())["hidden_size"] == 32
