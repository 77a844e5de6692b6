"""Configuration that cannot work is refused before any work (issue 18, 21): no LLM call spent, no
weights read; a hub or endpoint that cannot be reached is one line with exit status 2, tested
with the network unreachable (a closed port), not only with HF_HUB_OFFLINE."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmd.cli import main
from tests.cli.test_generate import FAST, LAYOUT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def llm_env(clean_env, fake_llm, monkeypatch, tiny_conditioning_files):
    """Settings pointing at the fake LLM (which counts requests) and the tiny conditioning files,
    GlueNet with a French checkpoint only."""
    for name, value in fake_llm.env().items():
        monkeypatch.setenv(name, value)
    files = tiny_conditioning_files
    monkeypatch.setenv("LMD_ELLA_CHECKPOINT", str(files["ella"]))
    monkeypatch.setenv("LMD_ELLA_T5", str(files["t5"]))
    monkeypatch.setenv("LMD_GLUENET_CHECKPOINTS", json.dumps({"fr": str(files["gluenet_fr"])}))
    monkeypatch.setenv("LMD_GLUENET_XLMR", str(files["xlmr"]))
    return fake_llm


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lmd generate: error: "), err
    return err


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, ["ein roter Hund in einem Park", "--conditioning", "gluenet"],
         "gluenet has no checkpoint for language 'de', the prompt's (configured: fr; set LMD_GLUENET_CHECKPOINTS"),
        ({}, ["un chat rouge dans un parc", "--conditioning", "gluenet", "--language", "it"],
         "gluenet has no checkpoint for language 'it'"),
        ({"LMD_ELLA_CHECKPOINT": "/nonexistent/ella.safetensors"}, ["a red cat", "--conditioning", "ella"],
         "LMD_ELLA_CHECKPOINT: /nonexistent/ella.safetensors is not a file"),
        ({"LMD_ELLA_T5": "/nonexistent/flan-t5-xl"}, ["a red cat", "--conditioning", "ella"],
         "LMD_ELLA_T5: the t5 encoder directory /nonexistent/flan-t5-xl does not exist"),
        ({"LMD_GLUENET_XLMR": "~/nonexistent-xlmr"}, ["un chat rouge dans un parc", "--conditioning", "gluenet"],
         "LMD_GLUENET_XLMR: the xlmr encoder directory ~/nonexistent-xlmr does not exist"),
        ({}, ["a red cat", "--conditioning", "connector:/nonexistent/connector"],
         "/nonexistent/connector is not an exported connector"),
    ],
)
def test_a_conditioning_that_cannot_work_is_refused_before_planning(llm_env, tiny_sd_path, monkeypatch, capsys, env, args, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    err = _refused(capsys, ["generate", *args, "--model", str(tiny_sd_path), *FAST])
    assert message in err
    assert llm_env.requests == []  # no LLM call spent


def test_lmd_plus_on_a_unet_without_gligen_is_refused_from_its_config_alone(llm_env, tiny_sd_path, tmp_path, capsys):
    """A model directory holding nothing but the UNet's config.json: the refusal cannot have read weights."""
    model = tmp_path / "config-only"
    (model / "unet").mkdir(parents=True)
    shutil.copy(tiny_sd_path / "unet" / "config.json", model / "unet" / "config.json")
    err = _refused(capsys, ["generate", "a red cat", "--variant", "lmd_plus", "--model", str(model), *FAST])
    assert "variant lmd_plus needs a GLIGEN UNet (attention_type 'gated')" in err and str(model) in err
    assert llm_env.requests == []


def test_lmd_plus_on_a_gligen_unet_passes_the_check(llm_env, tiny_gligen_sd_path, capsys):
    from grounded_sd.preflight import check_variant

    check_variant(tiny_gligen_sd_path, "lmd_plus")  # no exception
    check_variant("nobody/not-in-the-cache", "lmd_plus", download=False)  # unknown here: left to the worker


# --- the network unreachable --------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_offline_network(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``lmd ARGS`` in a process whose hub is a closed port, with HF_HUB_OFFLINE unset and an empty
    hub cache: what a machine without network sees."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LMD_", "HF_")) and k not in ("OPENAI_API_KEY", "TRANSFORMERS_OFFLINE")}
    clean.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
                 LMD_TORCH_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "lmd", *args], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=240)


def test_the_readme_command_without_network_is_one_line(tmp_path):
    result = _run_offline_network(["generate", "three cats on a sofa, a red lamp on the left, no dogs", "--quiet"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lmd generate: error: cannot reach the Hugging Face hub at http://127.0.0.1:")
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5 (LMD_SD_MODEL)" in lines[0]
    assert "Qwen/Qwen2.5-1.5B-Instruct (LMD_LOCAL_LLM_MODEL)" in lines[0] and "not in the local cache" in lines[0]


@pytest.mark.skipif(not (ROOT / "models" / "shapes" / "unet").is_dir(), reason="the shapes model is not in this checkout")
def test_the_readmes_offline_eval_needs_no_planner_and_no_network(tmp_path):
    """``lmd eval --world shapes`` reads the stored perfect layouts: the planner's model is not
    asked for (it was, and the README's offline command failed on a machine without network)."""
    result = _run_offline_network(["eval", "--world", "shapes", "--limit", "1", "--steps", "2", "--preset", "fast",
                                   "--model", str(ROOT / "models" / "shapes"), "--out", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 generated" in result.stdout


def test_plan_with_the_local_model_and_without_network_is_one_line(tmp_path):
    result = _run_offline_network(["plan", "a cat"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot reach the Hugging Face hub" in result.stderr, result.stderr


def test_a_model_in_the_cache_renders_without_network(tmp_path, tiny_sd_path):
    """The hub unreachable and the model in the local cache: the run goes offline and renders."""
    snapshot = tmp_path / "hf" / "hub" / "models--tiny--sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd_path, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (tmp_path / "layout.json").write_text(json.dumps(LAYOUT))
    result = _run_offline_network(["generate", "--layout", "layout.json", "--out", "out", "--model", "tiny/sd", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "image.png").is_file()
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_llm_endpoint_is_one_line_before_any_model_loads(tmp_path, tiny_sd_path):
    port = _closed_port()
    result = _run_offline_network(["generate", "a cat", "--model", str(tiny_sd_path), *FAST], tmp_path,
                                  LMD_LLM_BASE_URL=f"http://127.0.0.1:{port}/v1", LMD_LLM_MAX_ATTEMPTS="4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # no retry lines
    assert result.stderr.startswith(f"lmd generate: error: cannot reach LLM endpoint http://127.0.0.1:{port}/v1")


def test_a_network_failure_anywhere_is_one_line(monkeypatch, capsys, clean_env):
    """The CLI's last net: a transport error no command caught becomes one line, exit status 2."""
    import httpx

    from lmd.commands import info

    def unreachable(args):
        request = httpx.Request("GET", "http://127.0.0.1:9/x")
        raise RuntimeError("loading failed") from httpx.ConnectError("[Errno 111] Connection refused", request=request)

    monkeypatch.setattr(info, "run_info", unreachable)  # registered as the handler when main builds the parser
    assert main(["info", str(clean_env / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmd info: error: cannot reach http://127.0.0.1:9: [Errno 111] Connection refused;") and err.count("\n") == 1


# --- the summary and the report name the conditioning ---------------------------------------------
def test_the_summary_and_the_report_name_the_conditioning(llm_env, tiny_sd_path, capsys):
    layout_path = Path.cwd() / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    out = Path.cwd() / "out"
    argv = ["generate", "--layout", str(layout_path), "--out", str(out), "--model", str(tiny_sd_path), "--conditioning", "ella", *FAST]
    assert main([*argv, "--conditioning-mode", "concat"]) == 0, capsys.readouterr().err
    summary = capsys.readouterr().out.splitlines()
    assert ", conditioning ella (concat), " in summary[1]
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert notes[0] == "conditioned on ella, concat mode: guidance and denoising both read the conditioning's tokens before CLIP's"
    assert f"  note: {notes[0]}" in summary


def test_generate_writes_to_a_new_default_directory(clean_env, tiny_sd_path, capsys):
    (clean_env / "layout.json").write_text(json.dumps(LAYOUT))
    for _ in range(2):
        assert main(["generate", "--layout", "layout.json", "--model", str(tiny_sd_path), "--seed", "1", *FAST]) == 0
    runs = sorted((clean_env / "outputs").iterdir())
    assert len(runs) == 2 and all((run / "image.png").is_file() for run in runs)  # the second run kept the first's files
    assert f"wrote outputs/{runs[1].name}/image.png" in capsys.readouterr().out
