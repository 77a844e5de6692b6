"""The shapes world's segmenter in SAM's place: exact object masks from a click or a box, and
what grounded_sd.masks makes of them (docs/shapes.md, "Masks")."""

from __future__ import annotations

import random

import numpy as np
import pytest

from grounded_sd.masks import object_mask
from lmd.shapes import SHAPES_MODEL, world
from lmd.shapes.grounding import visible_index
from lmd.shapes.segmenter import ShapesSegmenter


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _scenes(count: int, seed: int = 7):
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(count)]
    return [s for s in scenes if s.things]


def test_a_click_on_an_object_gives_its_visible_pixels():
    segmenter = ShapesSegmenter()
    checked = 0
    for scene in _scenes(40):
        visible = visible_index(scene)
        segmenter.set_image(np.asarray(world.render(scene)))
        for index, thing in enumerate(scene.things, start=1):
            truth = visible == index
            if truth.sum() < 40:  # mostly covered by another object
                continue
            ys, xs = np.nonzero(truth)
            middle = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
            masks, scores, _ = segmenter.predict(point_coords=np.array([[xs[middle], ys[middle]]]), point_labels=np.array([1]))
            assert masks.shape == (3, world.SIZE, world.SIZE) and scores.shape == (3,)
            assert _iou(masks[1], truth) >= 0.9, (thing, _iou(masks[1], truth))
            assert (masks[0] >= masks[1]).all() and masks[0].sum() > masks[1].sum()  # the grown candidate
            assert scores.min() >= 0.85  # passes grounded_sd.masks' predicted-IoU check
            checked += 1
    assert checked >= 40


def test_a_click_beside_an_object_reaches_it_and_one_far_from_all_finds_nothing():
    scene = world.Scene("a grey floor", (world.Thing("red", "square", (20, 20, 36, 36)),))
    segmenter = ShapesSegmenter()
    segmenter.set_image(world.render(scene))
    truth = visible_index(scene) == 1
    masks, _, _ = segmenter.predict(point_coords=np.array([[38.0, 28.0]]))  # 2 px right of the edge
    assert _iou(masks[1], truth) >= 0.95
    masks, scores, _ = segmenter.predict(point_coords=np.array([[55.0, 55.0]]))
    assert not masks.any() and not scores.any()


def test_a_box_prompt_gives_the_object_that_fills_most_of_the_box():
    scene = world.Scene("a blue sky", (world.Thing("red", "circle", (4, 4, 22, 22)), world.Thing("green", "triangle", (24, 30, 50, 56))))
    segmenter = ShapesSegmenter()
    segmenter.set_image(world.render(scene))
    masks, _, _ = segmenter.predict(box=np.array([20.0, 20.0, 60.0, 60.0]))
    assert _iou(masks[1], visible_index(scene) == 2) >= 0.95


def test_as_sam_it_keeps_a_squares_corners_that_the_attention_mask_rounds_off():
    """What it changes in LMD: the mask pasted into the composition (§2.4, §2.5) has the drawn
    object's outline, where the attention's coarse mask is a smoothed blob."""
    box = (8, 8, 56, 56)  # the layout's box; the model drew its square smaller, as it does
    scene = world.Scene("a grey floor", (world.Thing("yellow", "square", (20, 20, 40, 40)),))
    image = np.asarray(world.render(scene))
    truth = visible_index(scene) == 1
    cells = np.arange(16) + 0.5
    attention = np.exp(-((cells[:, None] - 7.5) ** 2 + (cells[None, :] - 7.5) ** 2) / (2 * 2.0**2))  # a guided map's blob
    normalised = tuple(v / world.SIZE for v in box)
    coarse = object_mask(image, attention, normalised, predictor=None)
    segmented = object_mask(image, attention, normalised, predictor=ShapesSegmenter())
    assert coarse.source == "attention" and segmented.source == "sam"
    assert (segmented.mask >= truth).all() and _iou(segmented.mask, truth) >= 0.8  # the grown candidate: the largest wins
    assert _iou(segmented.mask, truth) > _iou(coarse.mask, truth) + 0.1, (_iou(segmented.mask, truth), _iou(coarse.mask, truth))


def test_predict_needs_an_image_and_a_prompt():
    segmenter = ShapesSegmenter()
    with pytest.raises(RuntimeError, match="set_image"):
        segmenter.predict(point_coords=np.array([[1.0, 1.0]]))
    segmenter.set_image(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="point_coords or box"):
        segmenter.predict()


@pytest.mark.skipif(not (SHAPES_MODEL / "unet").is_dir(), reason="the shapes model is not in this checkout")
def test_the_setting_puts_it_in_the_pipeline_in_sams_place():
    from lmd import wiring
    from lmd.settings import Settings

    settings = Settings(_env_file=None, sd_model=str(SHAPES_MODEL), device="cpu", dtype="float32")
    assert wiring.load_pipeline(settings).sam_predictor is None  # no SAM checkpoint: attention masks
    assert isinstance(wiring.load_pipeline(settings, segmenter="shapes").sam_predictor, ShapesSegmenter)
    assert wiring.load_pipeline(settings, segmenter="shapes", use_sam=False).sam_predictor is None  # plain SD cuts no masks
    shapes = settings.model_copy(update={"segmenter": "shapes"})
    assert isinstance(wiring.load_pipeline(shapes).sam_predictor, ShapesSegmenter)
    with pytest.raises(wiring.SettingsError, match="choose one segmenter"):
        wiring.load_pipeline(shapes, sam_checkpoint="/srv/sam_vit_b.pth")


@pytest.mark.skipif(not (SHAPES_MODEL / "unet").is_dir(), reason="the shapes model is not in this checkout")
def test_the_readmes_offline_demo_runs_as_written_and_cuts_its_masks_with_the_segmenter(tmp_path):
    import json
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    line = next(l for l in (repo / "README.md").read_text().splitlines() if "examples/shapes-layout.json" in l and "generate" in l)
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/lmd" and "--segmenter" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lmd.cli", *argv[1:], "--quiet", "--steps", "12"], cwd=repo,
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sources = [o["mask_source"] for o in report["objects"]]
    assert "sam" in sources, report["objects"]  # the segmenter answered in SAM's place for at least one object


def test_nonsense_about_segmenters_is_one_line_before_any_work(clean_env, capsys, monkeypatch):
    from lmd.cli import main

    layout = clean_env / "layout.json"
    layout.write_text('{"objects": [], "background": "a grey floor"}')
    sam = clean_env / "sam_vit_b.pth"
    sam.write_bytes(b"not read")
    code = main(["generate", "--layout", str(layout), "--segmenter", "shapes", "--sam-checkpoint", str(sam),
                 "--out", str(clean_env / "out"), "--quiet"])  # fmt: skip
    assert code == 2 and not (clean_env / "out").exists()
    assert capsys.readouterr().err.strip() == (
        "lmd generate: error: --segmenter shapes cuts masks without SAM; it does not combine with --sam-checkpoint"
    )
    code = main(["eval", "--world", "shapes", "--segmenter", "shapes", "--sam-checkpoint", str(sam), "--out", str(clean_env / "run")])
    assert code == 2 and not (clean_env / "run").exists()
    assert "--segmenter shapes cuts masks without SAM" in capsys.readouterr().err
    monkeypatch.setenv("LMD_SEGMENTER", "grabcut")
    code = main(["generate", "--layout", str(layout), "--out", str(clean_env / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "LMD_SEGMENTER" in err, err
