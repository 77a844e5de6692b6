"""Single-file checkpoints that load: the tiny random SD 1.x, SD 2.x and SDXL base models written as
one file in the original layout (tests.support.original_layout: CLIP's keys for SD 1.x, OpenCLIP's for
SD 2.x, both under ``conditioner.embedders.`` for SDXL), loaded through ``LMDPipeline.from_pretrained(file)`` offline with configs from a
directory that holds no weights. The weights must be the directory model's, tensor by tensor,
and so must a short LMD run's image; the kind is read from the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grounded_sd import LMDOptions, LMDPipeline, ModelLoadError
from grounded_sd.random_model import build_random_sd
from grounded_sd.single_file import model_kind, read_checkpoint
from lmd.cli import main
from tests.support.builders import box_object, layout_data
from tests.support.original_layout import write_single_file

SIZE = 64
LAYOUT = layout_data(box_object("cat", "a red cat", [0.05, 0.1, 0.45, 0.6]), background="a realistic park")
FAST = ["--steps", "3", "--width", "64", "--height", "64", "--quiet", "--device", "cpu", "--seed", "4"]


def configs_only(model_dir: Path, dest: Path) -> Path:
    """``model_dir``'s JSON and tokenizer files, no weights: what a single file's configs are read from."""
    for source in model_dir.rglob("*"):
        if source.is_file() and (source.suffix in (".json", ".txt") or source.parent.name == "tokenizer"):
            target = dest / source.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    assert not [p for p in dest.rglob("*") if p.suffix in (".safetensors", ".bin")]
    return dest


@pytest.fixture(scope="module")
def sd2_path(tmp_path_factory):
    return build_random_sd(tmp_path_factory.mktemp("tiny_sd2"), shape="tiny_sd2")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd_path, sd2_path, tiny_sdxl_path):
    """name -> (directory, single file, weightless configs, the kind the file should read as)."""
    root = tmp_path_factory.mktemp("single_files")
    return {
        "sd1": (tiny_sd_path, write_single_file(tiny_sd_path, root / "tiny.safetensors"),
                configs_only(tiny_sd_path, root / "sd1-configs"), "v1"),
        "sd1-ckpt": (tiny_sd_path, write_single_file(tiny_sd_path, root / "tiny.ckpt"),
                     configs_only(tiny_sd_path, root / "sd1-configs-ckpt"), "v1"),
        "sd2": (sd2_path, write_single_file(sd2_path, root / "tiny-sd2.safetensors", text_layout="open_clip"),
                configs_only(sd2_path, root / "sd2-configs"), "v2"),
        "sdxl": (tiny_sdxl_path, write_single_file(tiny_sdxl_path, root / "tiny-sdxl.safetensors", text_layout="sdxl"),
                 configs_only(tiny_sdxl_path, root / "sdxl-configs"), "xl_base"),
    }


@pytest.fixture(scope="module")
def loaded(models):
    """name -> (the directory's pipeline, the single file's pipeline), loaded once each."""
    torch.set_num_threads(1)
    out, by_dir = {}, {}
    for name, (directory, file, configs, _) in models.items():
        if directory not in by_dir:
            by_dir[directory] = LMDPipeline.from_pretrained(directory, device="cpu")
        out[name] = (by_dir[directory], LMDPipeline.from_pretrained(file, device="cpu", single_file_config=str(configs)))
    return out


def public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


@pytest.mark.parametrize("name", ["sd1", "sd1-ckpt", "sd2", "sdxl"])
def test_the_kind_is_read_from_the_written_file(models, name):
    _, file, _, kind = models[name]
    assert model_kind(read_checkpoint(file), file.name) == kind


@pytest.mark.parametrize("name", ["sd1", "sd1-ckpt", "sd2", "sdxl"])
def test_a_single_file_loads_the_weights_of_the_directory_it_was_written_from(loaded, name):
    """SDXL: both text encoders, the second's projection included (stored transposed in the file),
    and the UNet's added-condition embedding (``label_emb``)."""
    directory, single = loaded[name]
    assert single.is_sdxl == directory.is_sdxl == (name == "sdxl")
    for part in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if name == "sdxl" else ()):
        ours, theirs = getattr(single, part).state_dict(), getattr(directory, part).state_dict()
        assert sorted(ours) == sorted(theirs), part
        differ = [key for key in ours if not torch.equal(ours[key], theirs[key])]
        assert not differ, f"{part}: {differ[:5]}"
    assert public(single.unet.config) == public(directory.unet.config)
    assert public(single.vae.config) == public(directory.vae.config)
    assert single.text_encoder.config.hidden_act == directory.text_encoder.config.hidden_act
    assert single.scheduler.config.prediction_type == directory.scheduler.config.prediction_type
    assert single.tokenizer.get_vocab() == directory.tokenizer.get_vocab()
    if name == "sdxl":
        assert type(single.text_encoder_2) is type(directory.text_encoder_2)
        assert single.tokenizer_2.pad_token == directory.tokenizer_2.pad_token == "!"
        assert "text_projection.weight" in single.text_encoder_2.state_dict()


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_an_lmd_run_on_the_single_file_draws_the_directorys_image(loaded, name):
    images = []
    for pipe in loaded[name]:
        result = pipe(LAYOUT, seed=5, width=SIZE, height=SIZE, options=LMDOptions.reference(steps=3))
        assert [stage.name for stage in result.report.stages] == ["per_box", "masks", "final"]
        images.append(np.asarray(result.image, dtype=np.int16))
    assert images[0].std() > 1
    # equal weights, but the file's tensors sit unaligned in its buffer, so the CPU kernels round a UNet
    # forward ~2e-6 differently (bit-equal once the parameters are cloned): at most one level per pixel
    assert np.abs(images[0] - images[1]).max() <= 1


def test_lmd_generate_takes_a_single_file_with_its_configs_from_the_setting(models, clean_env, monkeypatch, capsys):
    directory, file, configs, _ = models["sd1"]
    layout = clean_env / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    monkeypatch.setenv("LMD_SINGLE_FILE_CONFIG", str(configs))
    for model, out in ((file, "file"), (directory, "dir")):
        code = main(["generate", "--layout", str(layout), "--model", str(model), "--out", str(clean_env / out), *FAST])
        assert code == 0, capsys.readouterr().err
    file_image, dir_image = (np.asarray(Image.open(clean_env / d / "image.png"), dtype=np.int16) for d in ("file", "dir"))
    assert np.abs(file_image - dir_image).max() <= 1


@pytest.mark.parametrize(("name", "kind", "repo"), [("sd1", "SD 1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                                    ("sd2", "SD 2.x", "stabilityai/stable-diffusion-2-1"),
                                                    ("sdxl", "SDXL", "stabilityai/stable-diffusion-xl-base-1.0")])
def test_offline_without_configs_the_written_file_is_one_line_naming_its_kind(models, tmp_path, monkeypatch, name, kind, repo):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    file = models[name][1]
    with pytest.raises(ModelLoadError) as error:
        LMDPipeline.from_pretrained(file, device="cpu")
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{file.name} is a {kind} checkpoint")
    assert repo in message and "LMD_SINGLE_FILE_CONFIG" in message


def test_configs_of_another_topology_are_one_line(models):
    """The SD 2 model's configs for the SD 1 file: diffusers cannot place the weights, and says so in one line."""
    file, sd2_configs = models["sd1"][1], models["sd2"][2]
    with pytest.raises(ModelLoadError) as error:
        LMDPipeline.from_pretrained(file, device="cpu", single_file_config=str(sd2_configs))
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"cannot load {file.name} as SD 1.x with the configs of {sd2_configs}")
    assert "proj_in.weight expected shape" in message  # diffusers' own reason: SD 2's linear projections



@pytest.mark.parametrize(("name", "configs_of"), [("sdxl", "sd1"), ("sd1", "sdxl")])
def test_configs_of_the_other_family_are_named_in_one_line(models, name, configs_of):
    """An SDXL file with SD 1.x configs, or the reverse: refused before diffusers reads a weight."""
    file, configs = models[name][1], models[configs_of][2]
    with pytest.raises(ModelLoadError) as error:
        LMDPipeline.from_pretrained(file, device="cpu", single_file_config=str(configs))
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    kind, declared = ("SDXL", "SD 1.x/2.x") if name == "sdxl" else ("SD 1.x", "SDXL")
    assert message.startswith(f"{file.name} is a {kind} checkpoint but LMD_SINGLE_FILE_CONFIG {configs} holds an {declared} model's configs")

