"""The connector harness against the shapes world's model topology (lmd.shapes.model: 64 px,
a 4x autoencoder, a two-level UNet with 64-wide cross-attention) and a folder of the world's
scenes and captions: both connector kinds train, hold out captions and export what loads for
that UNet. Random weights: this checks that the harness fits the world, not what it learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmd.cli import main
from lmd.shapes import model as shapes_model
from lmd.shapes import world


@pytest.fixture(scope="module")
def shapes_model_dir(tmp_path_factory) -> Path:
    """The world's model layout (unet/, vae/, scheduler/) with random weights."""
    path = tmp_path_factory.mktemp("shapes_model")
    torch.manual_seed(0)
    shapes_model.build_vae().save_pretrained(path / "vae")
    shapes_model.build_unet().save_pretrained(path / "unet")
    shapes_model.build_scheduler().save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory) -> Path:
    """``NNN.png`` + ``NNN.txt``: rendered scenes with their full captions."""
    path = tmp_path_factory.mktemp("shapes_world")
    rng = random.Random(0)
    for index in range(12):
        scene = world.random_scene(rng)
        world.render(scene).save(path / f"{index:03d}.png")
        (path / f"{index:03d}.txt").write_text(world.full_caption(scene, rng) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["lidit", "ella"])
def test_both_connector_kinds_train_on_the_shapes_world(tmp_path, shapes_model_dir, world_folder, tiny_llm_path, tiny_conditioning_files, kind):
    from diffusers import UNet2DConditionModel

    from grounded_sd.conditioning.connector import ConnectorConditioning

    out = tmp_path / kind
    encoder = tiny_llm_path if kind == "lidit" else tiny_conditioning_files["t5"]
    config = {
        "base_model": str(shapes_model_dir), "output_dir": str(out),
        "connector": {"kind": kind, "encoders": [{"model": str(encoder), "max_tokens": 16}], "refiner": {"cond_dim": 16},
                      "ella": {"layers": 1, "latents": 8}},
        "data": {"path": str(world_folder), "num_workers": 0, "holdout": 0.25, "cache_features": True, "cache_latents": True},
        "optimizer": {"warmup_steps": 0},
        "training": {"steps": 2, "batch_size": 3, "tracker": "none"},
        "validation": {"every": 2, "steps": 1, "prompts": ["a grey floor with a red circle"]},
    }
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps(config))  # YAML reads JSON
    assert main(["train-connector", "--config", str(config_file), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_images"] + summary["held_out_images"] == 12 and summary["held_out_images"] > 0
    assert list(summary["validation_losses"]) == ["0", "2"]
    assert (out / "validation" / "step-000002" / "p00_s0.png").is_file()  # 64 px through the world's VAE
    conditioning = ConnectorConditioning.from_path(out / "connector")
    unet = UNet2DConditionModel.from_pretrained(shapes_model_dir, subfolder="unet")
    conditioning.check_unet(unet)  # 64-wide tokens for the world's UNet
    assert conditioning.output_dim == shapes_model.TEXT_HIDDEN


def test_tiny_encoders_built_over_the_worlds_words_read_every_caption_word_by_word(tmp_path):
    """benchmarks/shapes_connectors.py builds its random LLM and T5 over the world's words, so a
    connector sees each word as one token (the tests' default vocabulary lacks "circle", "floor")."""
    from transformers import AutoTokenizer

    from benchmarks.shapes_connectors import world_words
    from grounded_sd.conditioning.random_encoders import build_random_t5
    from tests.support.tiny_lm import build_tiny_llm

    words = world_words()
    llm = AutoTokenizer.from_pretrained(build_tiny_llm(tmp_path / "llm", hidden=16, layers=1, words=words))
    t5 = AutoTokenizer.from_pretrained(build_random_t5(tmp_path / "t5", d_model=16, words=[w.lower() for w in words]))
    rng = random.Random(1)
    captions = [world.caption(world.random_scene(rng), rng) for _ in range(500)]
    assert any(" without " in c for c in captions) and any(" on the " in c for c in captions)
    for text in filter(None, captions):
        pieces = text.replace(",", " ,").split()
        assert len(llm(text, add_special_tokens=False).input_ids) == len(pieces), text
        ids = t5(text, add_special_tokens=False).input_ids
        assert len(ids) == len(pieces) and t5.unk_token_id not in ids, text
