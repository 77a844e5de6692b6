"""``lmd generate`` on the tiny local model: every output file, prompt mode through the fake
LLM server, and one-line errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from layout_planner import Layout
from layout_planner.rescale import rescale_boxes
from lmd.cli import main
from tests.support.builders import box_object, layout_data

LAYOUT = layout_data(
    box_object("cat", "a red cat", [0.05, 0.1, 0.45, 0.6]),
    box_object("dog", "a dog", [0.5, 0.4, 0.95, 0.95]),
    background="a realistic park",
)
FAST = ["--steps", "4", "--width", "64", "--height", "64", "--quiet", "--device", "cpu"]


def test_generate_from_a_layout_writes_every_output(clean_env, tiny_sd_path, capsys):
    layout_path = clean_env / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    out = clean_env / "out"
    code = main(["generate", "--layout", str(layout_path), "--out", str(out), "--model", str(tiny_sd_path), "--seed", "3", *FAST])
    assert code == 0, capsys.readouterr().err
    for name in ("image.png", "overlay.png", "layout.json", "report.json", "masks/cat.png", "masks/dog.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "image.png").size == (64, 64)
    assert Image.open(out / "masks" / "cat.png").mode == "L"
    saved = Layout.model_validate_json((out / "layout.json").read_text())  # the boxes as generated (reference rescales)
    assert saved == rescale_boxes(Layout.model_validate(LAYOUT))[0] and "rescaled" in [w.tag for w in saved.warnings]
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 3 and report["steps"] == 4 and report["variant"] == "lmd"
    assert [s["name"] for s in report["stages"]] == ["per_box", "masks", "final"]
    assert {o["id"]: o["mask_source"] for o in report["objects"]}.keys() == {"cat", "dog"}
    stdout = capsys.readouterr().out
    assert "seed 3" in stdout and "image.png" in stdout
    assert "per-box energy" in stdout and "(first guided step)" in stdout


def test_generate_from_a_prompt_plans_then_renders(clean_env, tiny_sd_path, fake_llm, monkeypatch, capsys):
    for name, value in fake_llm.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LMD_MAX_BATCH", "1")
    fake_llm.enqueue({"objects": [{"id": "dog", "phrase": "a dog", "box": [0, 256, 256, 256]}], "background": "a beach", "negative": "people"})
    out = clean_env / "out"
    code = main(["generate", "a dog on a beach, no people", "--out", str(out), "--model", str(tiny_sd_path), "--preset", "fast", *FAST])
    assert code == 0, capsys.readouterr().err
    assert len(fake_llm.requests) == 1
    layout = Layout.model_validate_json((out / "layout.json").read_text())
    assert layout.phrases() == ["a dog"]
    report = json.loads((out / "report.json").read_text())
    assert report["prompt"] == "a beach with a dog" and report["negative_prompt"].startswith("people")
    assert (out / "masks" / "dog.png").is_file()
    assert report["options"]["max_batch"] == 1 and set(report["unet_total"]["forward_batch_sizes"]) == {"1"}
    assert "per-box energy" in capsys.readouterr().out  # fast: the energy before guidance only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/sd-model"], "model not found: /nonexistent/sd-model"),
        (["--width", "60"], "--width must be a positive multiple of 8"),
        (["--sam-checkpoint", "/nonexistent/sam.pth"], "SAM checkpoint not found"),
        (["--variant", "lmd_plus"], "lmd_plus needs a GLIGEN UNet"),
        (["--scheduler", "HeunDiscreteScheduler"], "LMD needs one per step"),
    ],
)
def test_generate_errors_are_one_line(clean_env, tiny_sd_path, capsys, args, message):
    layout_path = clean_env / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    argv = ["generate", "--layout", str(layout_path), "--out", str(clean_env / "out"), "--model", str(tiny_sd_path), *FAST, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (clean_env / "out" / "image.png").exists()


def test_bad_layout_json_names_the_field(clean_env, tiny_sd_path, capsys):
    bad = {"objects": [box_object(box=[0.2, 0.2, 1.4, 0.5])]}
    layout_path = clean_env / "bad.json"
    layout_path.write_text(json.dumps(bad))
    assert main(["generate", "--layout", str(layout_path), "--out", str(clean_env / "out"), "--model", str(tiny_sd_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "objects.0.box" in err and "leaves the canvas" in err
    layout_path.write_text("{not json")
    assert main(["generate", "--layout", str(layout_path), "--out", str(clean_env / "out"), *FAST]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_generate_needs_exactly_one_source(clean_env, capsys):
    assert main(["generate", "a cat", "--layout", "x.json", "--out", "o"]) == 2
    assert "either a PROMPT or --layout" in capsys.readouterr().err


def test_generate_with_the_refiner_finishes_and_reports_it(clean_env, tiny_sd_path, tiny_refiner_path, monkeypatch, capsys):
    monkeypatch.setenv("LMD_REFINER_RESOLUTION", "96")
    layout_path = clean_env / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    out = clean_env / "out"
    argv = ["generate", "--layout", str(layout_path), "--out", str(out), "--model", str(tiny_sd_path), "--seed", "3", *FAST]
    code = main([*argv, "--refiner", str(tiny_refiner_path), "--refiner-strength", "0.1"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out / "image.png").size == (96, 96)
    refiner = json.loads((out / "report.json").read_text())["refiner"]
    assert refiner["strength"] == 0.1 and refiner["steps"] == 5 and refiner["model"] == str(tiny_refiner_path)
    assert "refined with" in capsys.readouterr().out
    # LMD_REFINER is the default; --no-refiner skips it
    monkeypatch.setenv("LMD_REFINER", str(tiny_refiner_path))
    assert main([*argv, "--no-refiner"]) == 0
    assert json.loads((out / "report.json").read_text())["refiner"] is None
    assert main([*argv, "--refiner", str(clean_env / "missing")]) == 2
    assert "refiner model directory not found" in capsys.readouterr().err
