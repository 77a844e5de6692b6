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
    assert (config.size, config.prompts, config.detector, config.model, config.layouts, config.segmenter) == (
        64, SHAPES_PROMPTS, SHAPES_DETECTOR, str(SHAPES_MODEL), "stored", "shapes"
    )
    assert EvalConfig(out=tmp_path, world="shapes", sam_checkpoint=tmp_path / "sam.pth").segmenter is None  # SAM asked for
    assert EvalConfig(out=tmp_path).segmenter is None  # LMD_SEGMENTER decides
    with pytest.raises(ValueError, match="--segmenter shapes .* --sam-checkpoint"):
        EvalConfig(out=tmp_path, world="shapes", segmenter="shapes", sam_checkpoint=tmp_path / "sam.pth")
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
    assert results["settings"]["sam"].startswith("shapes segmenter")
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


def _draw_layout(layout, seed):
    """An image drawn exactly at ``layout``'s boxes by the world's own renderer (what a perfect
    controller would draw): the layout's phrases are the world's "a <colour> <shape>"."""
    from lmd.shapes.world import SIZE, Scene, Thing, render

    things = []
    for obj in layout.objects:
        _, colour, shape = obj.phrase.split()
        things.append(Thing(colour, shape, tuple(round(v * SIZE) for v in obj.box)))
    return render(Scene(layout.background, tuple(things)))


@pytest.mark.parametrize("stretched", [True, False])
def test_placement_is_measured_against_the_boxes_the_image_was_drawn_for(tmp_path: Path, stretched: bool):
    """Under the reference preset the pipeline stretches the boxes over the canvas before drawing
    (layout_planner.rescale); placement must then look for each object in its stretched box, or a
    perfect drawing of the stretched layout scores as misplaced."""
    from layout_planner.layout import Layout
    from layout_planner.rescale import rescale_boxes
    from lmd.evaluation.detection import DetectorConfig
    from lmd.evaluation.prompts import BenchmarkPrompt
    from lmd.evaluation.runner import RunSettings, run_benchmark
    from lmd.shapes.detector import detect_for_eval

    small = Layout.model_validate({"background": "a grey floor", "objects": [  # both in the top-left quarter
        {"id": "a", "phrase": "a red square", "box": [0.05, 0.05, 0.2, 0.2]},
        {"id": "b", "phrase": "a blue square", "box": [0.3, 0.05, 0.45, 0.2]},
    ]})  # fmt: skip
    stretched_layout, rescale = rescale_boxes(small)
    assert rescale is not None and rescale.scale == 2.5  # the boxes move far: a real difference to measure
    prompt = BenchmarkPrompt(index=0, task="attribution", prompt="a grey floor with a red square and a blue square", layout=small)
    settings = RunSettings(method="perfect", variant="lmd", preset="reference", steps=1, model="world", scheduler="-",
                           dtype="float32", layouts="stored", seed=0, width=64, height=64, boxes_stretched=stretched)  # fmt: skip
    results = run_benchmark(
        [prompt], out=tmp_path, settings=settings, layout_source=lambda p: p.layout,
        make_generator=lambda: lambda layout, seed: _draw_layout(stretched_layout, seed),
        detector=detect_for_eval, detector_config=DetectorConfig(model=SHAPES_DETECTOR),
    )  # fmt: skip
    placed = results.prompts[0].placement
    assert len(placed) == 2
    assert all(p.hit and p.centred for p in placed) is stretched
    assert not any(p.centred for p in placed) or stretched
