"""The token-level attention loss the shapes model is fine-tuned with (lmd.shapes.grounding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmd.shapes import SHAPES_MODEL, grounding, world

TOKENIZER = SHAPES_MODEL / "tokenizer"
needs_model = pytest.mark.skipif(not (SHAPES_MODEL / "unet").is_dir(), reason="the shapes model is not in this checkout")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER)


SCENE = world.Scene(
    "a grey floor",
    (
        world.Thing("red", "circle", (4, 4, 20, 20)),
        world.Thing("blue", "square", (40, 40, 60, 60)),
        world.Thing("red", "circle", (40, 4, 56, 20)),
    ),
)


@needs_model
def test_groups_map_their_tokens_to_their_objects_pixels(tokenizer):
    text = "a grey floor with two red circles and a blue square"
    targets = grounding.token_targets(text, SCENE, tokenizer)
    ids = tokenizer(text).input_ids
    words = [[tokenizer.convert_ids_to_tokens(ids[i]) for i in t.tokens] for t in targets]
    assert words == [["red</w>", "circles</w>"], ["blue</w>", "square</w>"]]
    circles, square = targets
    assert circles.mask[12, 12] == 1 and circles.mask[12, 48] == 1 and circles.mask[50, 50] == 0
    assert square.mask[50, 50] == 1 and square.mask.sum() == 400 and circles.mask[0, 0] == 0


@needs_model
def test_without_a_colour_a_shape_means_all_of_them_and_negation_means_none(tokenizer):
    (squares,) = grounding.token_targets("a grey floor with a square", SCENE, tokenizer)
    assert squares.mask.sum() == 400
    (circles,) = grounding.token_targets("two circles", SCENE, tokenizer)
    assert circles.mask[12, 12] == circles.mask[12, 48] == 1
    assert grounding.token_targets("a grey floor without triangles", SCENE, tokenizer) == []
    assert grounding.token_targets("a grey floor with a green circle", SCENE, tokenizer) == []  # no such object


def _maps(attention_on: np.ndarray, side: int, token: int) -> dict[str, torch.Tensor]:
    """One layer, one sample, 2 heads, 77 tokens: ``token`` takes 0.9 of the cells in
    ``attention_on`` and nothing elsewhere; BOS (token 0) takes the rest of every cell."""
    probs = torch.zeros(1, 2, side * side, 77)
    on = torch.from_numpy(attention_on.reshape(-1)).float()
    probs[0, :, :, token] = 0.9 * on
    probs[0, :, :, 0] = 1 - 0.9 * on
    return {"layer": probs}


def test_the_loss_prefers_attention_on_the_object():
    mask = np.zeros((world.SIZE, world.SIZE), np.float32)
    mask[0:32, 0:32] = 1  # the top-left quarter
    target = [[grounding.TokenTarget((5,), mask)]]
    on = np.zeros((8, 8)); on[0:4, 0:4] = 1  # noqa: E702
    off = np.zeros((8, 8)); off[4:8, 4:8] = 1  # noqa: E702
    good = grounding.attention_loss(_maps(on, 8, 5), target)
    wrong_place = grounding.attention_loss(_maps(off, 8, 5), target)
    wrong_token = grounding.attention_loss(_maps(on, 8, 6), target)
    assert good < 0.5 < wrong_place and good < wrong_token
    inside, outside = grounding.attention_inside(_maps(on, 8, 5), target)
    assert inside == pytest.approx(0.9) and outside < 0.01


@needs_model
def test_fine_tuning_from_the_shipped_model_logs_the_attention_loss(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmd.shapes.train", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
               "--tokenizer", str(TOKENIZER), "--init", str(SHAPES_MODEL), "--scenes", "64", "--unet-steps", "5",
               "--unet-batch", "4", "--grounding-weight", "0.1", "--stop-after", "2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(UNet step 2)" in done.stdout  # stopped at step 2 of the 5-step schedule, as the shipped model was
    rows = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["attention"] > 0 and "inside" in r for r in rows)
    assert not any(r["phase"] == "vae" for r in rows)  # --init keeps the shipped autoencoder
    assert (tmp_path / "o" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
