"""``lmd generate --conditioning ella|gluenet`` on the tiny SD and tiny encoders, through the
settings (LMD_ELLA_*, LMD_GLUENET_*), and its one-line errors."""

from __future__ import annotations

import json

import pytest

from lmd.cli import main
from tests.cli.test_generate import FAST, LAYOUT


@pytest.fixture
def conditioning_env(clean_env, monkeypatch, tiny_conditioning_files):
    files = tiny_conditioning_files
    monkeypatch.setenv("LMD_ELLA_CHECKPOINT", str(files["ella"]))
    monkeypatch.setenv("LMD_ELLA_T5", str(files["t5"]))
    monkeypatch.setenv("LMD_GLUENET_CHECKPOINTS", json.dumps({"fr": str(files["gluenet_fr"])}))
    monkeypatch.setenv("LMD_GLUENET_XLMR", str(files["xlmr"]))
    return clean_env


def test_ella_from_a_layout(conditioning_env, tiny_sd_path, monkeypatch, capsys):
    layout_path = conditioning_env / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    out = conditioning_env / "out"
    monkeypatch.setenv("LMD_ELLA_NEGATIVE", "empty")  # the official pipeline's negative for every ELLA run...
    argv = ["generate", "--layout", str(layout_path), "--out", str(out), "--model", str(tiny_sd_path), "--conditioning", "ella", *FAST]
    assert main([*argv, "--conditioning-mode", "concat"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert (report["conditioning"], report["conditioning_mode"], report["conditioning_negative"]) == ("ella", "concat", "empty")
    assert main([*argv, "--conditioning-negative", "layout"]) == 0, capsys.readouterr().err  # ...unless a run names one
    assert json.loads((out / "report.json").read_text())["conditioning_negative"] == "layout"
    assert [s["name"] for s in report["stages"]] == ["per_box", "masks", "final"]


def test_gluenet_from_a_french_prompt(conditioning_env, tiny_sd_path, fake_llm, monkeypatch, capsys):
    for name, value in fake_llm.env().items():
        monkeypatch.setenv(name, value)
    fake_llm.enqueue({"objects": [{"id": "cat", "phrase": "a red cat", "box": [0, 256, 256, 256]}], "background": "a park"})
    out = conditioning_env / "out"
    prompt = "un chat rouge dans un parc"
    assert main(["generate", prompt, "--out", str(out), "--model", str(tiny_sd_path), "--conditioning", "gluenet", *FAST]) == 0, (
        capsys.readouterr().err
    )
    report = json.loads((out / "report.json").read_text())
    assert (report["conditioning"], report["language"], report["source_prompt"]) == ("gluenet", "fr", prompt)
    assert report["prompt"] == "a park with a red cat"  # guidance: the English layout


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"LMD_ELLA_CHECKPOINT": "/nonexistent/ella.safetensors"}, ["--conditioning", "ella"], "LMD_ELLA_CHECKPOINT: /nonexistent/ella.safetensors is not a file"),
        ({}, ["--conditioning", "gluenet"], "gluenet denoises with the user's prompt"),
        ({}, ["--conditioning", "t5"], "unknown conditioning 't5'"),
        ({}, ["--conditioning", "ella", "--language", "French"], "--language: language must be an ISO 639-1 code"),
    ],
)
def test_conditioning_errors_are_one_line(conditioning_env, tiny_sd_path, monkeypatch, capsys, env, args, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    layout_path = conditioning_env / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    argv = ["generate", "--layout", str(layout_path), "--out", str(conditioning_env / "out"), "--model", str(tiny_sd_path), *args, *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmd generate: error:") and message in err and "\n" not in err
