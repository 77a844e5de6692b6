"""``lmd generate`` with the operator's names: ``--model NAME`` through LMD_MODELS, ``--lora
NAME[:WEIGHT]`` through LMD_LORAS (recorded in the report and the PNG), one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from grounded_sd.image_parameters import read_parameters
from lmd.cli import main
from tests.support.builders import box_object, layout_data

LAYOUT = layout_data(box_object("cat", "a red cat", [0.05, 0.1, 0.45, 0.6]), background="a realistic park")
FAST = ["--steps", "3", "--width", "64", "--height", "64", "--quiet", "--device", "cpu", "--seed", "4"]


@pytest.fixture
def named(clean_env, monkeypatch, tiny_sd_path, tiny_loras):
    """LMD_MODELS and LMD_LORAS naming the tiny model and its adapters; the layout file."""
    monkeypatch.setenv("LMD_MODELS", json.dumps({"tiny": str(tiny_sd_path)}))
    monkeypatch.setenv("LMD_LORAS", json.dumps({"ink": str(tiny_loras["ink"]), "paper": str(tiny_loras["paper"])}))
    path = clean_env / "layout.json"
    path.write_text(json.dumps(LAYOUT))
    return path


def generate(layout, out, *extra: str) -> int:
    return main(["generate", "--layout", str(layout), "--out", str(out), *FAST, *extra])


def test_loras_by_name_with_weights_are_applied_and_recorded(named, clean_env, capsys):
    assert generate(named, clean_env / "plain", "--model", "tiny") == 0, capsys.readouterr().err
    assert generate(named, clean_env / "styled", "--lora", "ink:0.7", "--lora", "paper") == 0, capsys.readouterr().err
    assert "LoRA: ink x0.7, paper x1" in capsys.readouterr().out
    plain, styled = (np.asarray(Image.open(clean_env / d / "image.png"), dtype=np.int16) for d in ("plain", "styled"))
    assert np.abs(plain - styled).max() > 10
    used = [{"name": "ink", "weight": 0.7}, {"name": "paper", "weight": 1.0}]
    assert json.loads((clean_env / "styled" / "report.json").read_text())["loras"] == used
    assert [lora.model_dump() for lora in read_parameters(clean_env / "styled" / "image.png").loras] == used


@pytest.mark.parametrize(("arguments", "message"), [
    (["--lora", "nope"], "lmd generate: error: --lora: unknown LoRA 'nope'; this service has: ink, paper"),
    (["--lora", "ink", "--lora", "ink:0.5"], "lmd generate: error: --lora: LoRA 'ink' is named twice"),
    (["--lora", "ink:strong"], "lmd generate: error: argument --lora: the weight of 'ink' must be a number, got 'strong'"),
    (["--model", "other"], "lmd generate: error: model not found"),
])
def test_bad_names_are_one_line_and_exit_2(named, clean_env, capsys, arguments, message):
    try:
        code = generate(named, clean_env / "out", *arguments)
    except SystemExit as exc:  # argparse's own errors (a usage line, then the error)
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith(message), err
    assert not (clean_env / "out").exists()
