"""Which planner answers (LMD_PLANNER), and ``lmd plan`` / ``lmd eval-layouts`` with the local planner on a tiny random chat LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layout_planner import Layout
from lmd import wiring
from lmd.cli import main
from lmd.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_env(clean_env, monkeypatch, tiny_lm_path):
    """``clean_env`` (tests/support/cli_env.py) plus the tiny chat model as the local planner's."""
    monkeypatch.setenv("LMD_LOCAL_LLM_MODEL", str(tiny_lm_path))
    monkeypatch.setenv("LMD_LOCAL_LLM_DEVICE", "cpu")
    return monkeypatch


def test_auto_picks_local_without_an_endpoint_or_key_and_remote_with_one(clean_env, monkeypatch):
    choice = wiring.choose_planner(Settings(_env_file=None))
    assert (choice.kind, choice.model, choice.reason) == (
        "local", "Qwen/Qwen2.5-1.5B-Instruct", "LMD_PLANNER=auto and no LLM endpoint or key is configured")
    assert type(wiring.planner(Settings(_env_file=None)).config).__name__ == "LocalLLMConfig"

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    keyed = wiring.choose_planner(Settings(_env_file=None))
    assert (keyed.kind, keyed.endpoint, keyed.reason) == ("remote", "https://api.openai.com/v1", "LMD_PLANNER=auto and an LLM API key is set")
    assert type(wiring.planner(Settings(_env_file=None)).config).__name__ == "LLMConfig"

    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("LMD_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    assert wiring.choose_planner(Settings(_env_file=None)).reason == "LMD_PLANNER=auto and LMD_LLM_BASE_URL is set"
    monkeypatch.setenv("LMD_PLANNER", "local")
    assert wiring.choose_planner(Settings(_env_file=None)).kind == "local"
    monkeypatch.delenv("LMD_LLM_BASE_URL")
    monkeypatch.setenv("LMD_PLANNER", "remote")
    assert wiring.choose_planner(Settings(_env_file=None)).kind == "remote"


def test_the_local_config_carries_the_local_settings():
    config = wiring.local_llm_config(Settings(_env_file=None, local_llm_model="/m", local_llm_device="cuda:1",
                                              local_llm_dtype="float16", local_llm_max_new_tokens=64,
                                              local_llm_timeout_s=5, llm_temperature=0.0, llm_max_reasks=2))
    assert (config.model, config.device, config.dtype, config.max_tokens, config.timeout_s, config.temperature,
            config.max_reasks) == ("/m", "cuda:1", "float16", 64, 5, 0.0, 2)


def test_a_missing_local_model_directory_is_a_one_line_error_naming_the_setting(clean_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LMD_PLANNER", "local")
    monkeypatch.setenv("LMD_LOCAL_LLM_MODEL", str(tmp_path / "nowhere"))
    assert main(["plan", "a cat"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"lmd plan: local layout model {tmp_path / 'nowhere'}, run in this process (LMD_PLANNER=local)"
    assert lines[1:] == [
        f"lmd plan: error: the local planner model directory {tmp_path / 'nowhere'} does not exist; "
        f"{wiring.LOCAL_MODEL_HINT}"
    ]
    assert "LMD_LOCAL_LLM_MODEL" in wiring.LOCAL_MODEL_HINT


def test_without_a_key_offline_the_default_model_error_names_the_setting(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("LMD_LOCAL_LLM_MODEL", "lmd-test/not-downloaded")  # HF_HUB_OFFLINE=1 in tests/conftest.py
    assert main(["generate", "a cat", "--out", "out"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("lmd generate: error: the local planner model lmd-test/not-downloaded is not downloaded "
                              "and the hub is offline (HF_HUB_OFFLINE); set LMD_LOCAL_LLM_MODEL")
    assert len(err) == 2 and "LMD_PLANNER=auto and no LLM endpoint or key is configured" in err[0]


def test_lmd_plan_with_the_local_planner_prints_a_layout(local_env, tiny_lm_path, capsys):
    assert main(["plan", "three cats on a sofa, a red lamp on the left"]) == 0
    captured = capsys.readouterr()
    Layout.model_validate_json(captured.out)
    assert captured.err.splitlines()[0] == (
        f"lmd plan: local layout model {tiny_lm_path}, run in this process "
        "(LMD_PLANNER=auto and no LLM endpoint or key is configured)")


def test_batch_planning_and_eval_layouts_with_the_local_planner(local_env, tmp_path, capsys):
    rows = [json.loads(line) for line in (ROOT / "benchmarks" / "data" / "prompts.jsonl").read_text().splitlines()]
    picked = [next(row for row in rows if row["task"] == task) for task in ("negation", "numeracy", "spatial")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in picked))
    out = tmp_path / "layouts.jsonl"
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == [row["index"] for row in picked] and all("layout" in line for line in lines)
    capsys.readouterr()
    assert main(["eval-layouts", "--layouts", str(out), "--prompts", str(prompts), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["published"]["overall"]["total"] == 3
