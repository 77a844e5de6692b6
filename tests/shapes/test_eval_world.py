"""``lmd eval --world shapes``: the world's defaults, and a short run on the shipped model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmd.evaluation.config import EvalConfig
from lmd.shapes import SHAPES_DETECTOR, SHAPES_MODEL, SHAPES_PROMPTS


def test_world_defaults_and_what_does_not_combine(tmp_path: Path):
    config = EvalConfig(out=tmp_path, world="shapes")
    assert (config.size, config.prompts, config.detector, config.model, config.layouts) == (
        64, SHAPES_PROMPTS, SHAPES_DETECTOR, str(SHAPES_MODEL), "stored"
    )
    baseline = EvalConfig(out=tmp_path, world="shapes", baseline="sd")
    assert baseline.layouts is None and baseline.rendered_variant == "sd"
    assert EvalConfig(out=tmp_path).size == 512 and EvalConfig(out=tmp_path).layouts is None
    with pytest.raises(ValueError, match="--layouts"):
        EvalConfig(out=tmp_path, world="shapes", baseline="sd", layouts="stored")


@pytest.mark.skipif(not (SHAPES_MODEL / "unet").is_dir(), reason="the shapes model is not in this checkout")
def test_shapes_eval_scores_tasks_and_placement_on_the_shipped_model(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "lmd.cli", "eval", "--world", "shapes", "--out", str(out), "--limit", "4",
               "--steps", "2", "--preset", "fast"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["detector"]["model"] == SHAPES_DETECTOR
    assert results["settings"]["width"] == 64 and results["settings"]["layouts"].startswith("stored shapes_prompts.jsonl")
    assert results["scores"]["overall"]["total"] == 4
    placed = [p for row in results["prompts"] for p in row["placement"]]
    assert len(placed) == results["placement"]["overall"]["objects"] > 0  # every stored object is looked for
    assert "Objects drawn in their layout boxes" in (out / "results.md").read_text()


@pytest.mark.skipif(not (SHAPES_MODEL / "unet").is_dir(), reason="the shapes model is not in this checkout")
def test_images_default_to_the_models_own_size():
    from grounded_sd import LMDOptions, LMDPipeline
    from layout_planner.layout import Layout

    pipe = LMDPipeline.from_pretrained(SHAPES_MODEL, device="cpu", dtype="float32")
    assert pipe.native_size == 64
    result = pipe(Layout(objects=[], background="a grey floor"), seed=0, variant="sd",
                  options=LMDOptions.preset("fast").model_copy(update={"steps": 1}))
    assert result.image.size == (64, 64) and (result.report.width, result.report.height) == (64, 64)


def test_training_without_a_tokenizer_is_one_line(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lmd.shapes.train", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                           "--tokenizer", str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "no CLIP tokenizer" in done.stderr and "--tokenizer" in done.stderr
