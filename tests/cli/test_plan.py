"""``lmd plan`` against the fake OpenAI-compatible server: one prompt, --draw, --revise, batch mode and resume."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from layout_planner import Layout
from lmd.cli import main


@pytest.fixture
def llm_env(fake_llm, monkeypatch, tmp_path):
    """Point lmd.settings at the fake server; run in an empty directory (no stray .env)."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("LMD_") or n == "OPENAI_API_KEY"]:
        monkeypatch.delenv(name)
    for name, value in fake_llm.env().items():
        monkeypatch.setenv(name, value)
    return fake_llm


def test_plan_prints_a_layout_as_json(llm_env, capsys):
    llm_env.enqueue({"objects": [{"id": "dog", "phrase": "a dog", "box": [0, 256, 256, 256]}], "background": "a beach", "negative": "people"})
    assert main(["plan", "a dog on a beach, no people"]) == 0
    layout = Layout.model_validate_json(capsys.readouterr().out)
    assert layout.phrases() == ["a dog"] and layout.negative == "people"
    assert layout.objects[0].box == (0.0, 0.5, 0.5, 1.0)
    assert llm_env.requests[0].last_user_content == "Caption: a dog on a beach, no people"
    assert llm_env.requests[0].headers["authorization"] == "Bearer test-key"


def test_plan_prints_a_valid_layout_from_a_chatty_fenced_answer(llm_env, capsys):
    llm_env.enqueue(
        "<think>Two cats: left and right.</think>\nSure! Here is the layout:\n```json\n"
        '{"objects": [{"id": 1, "name": "a black cat", "bbox": {"x": 20, "y": 200, "w": 200, "h": 180}},\n'
        '  {"id": 1, "name": "a white cat", "bbox": {"x": 280, "y": 190, "w": 200, "h": 190}},],\n'
        '"background_prompt": "a realistic photo of a garden", "negative_prompt": "None"}\n```\nHope this helps!'
    )
    assert main(["plan", "two cats in a garden"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "lmd plan: warning: id: replaced id '1' of 'a white cat' (taken or malformed)\n"
    layout = Layout.model_validate_json(captured.out)
    assert layout.phrases() == ["a black cat", "a white cat"] and [o.id for o in layout.objects] == ["1", "cat"]
    assert (layout.background, layout.negative) == ("a realistic photo of a garden", "")
    assert [str(w) for w in layout.warnings] == ["id: replaced id '1' of 'a white cat' (taken or malformed)"]


def test_plan_draws_the_layout(llm_env, tmp_path, capsys):
    png = tmp_path / "layout.png"
    assert main(["plan", "--draw", str(png), "a cat"]) == 0
    with Image.open(png) as image:
        assert image.size == (512, 512)
        assert image.getpixel((64, 200)) != image.getpixel((400, 450))  # the box edge is drawn, the canvas is plain
    assert "drew 1 boxes" in capsys.readouterr().err


def test_plan_errors_are_one_line(llm_env, monkeypatch, capsys):
    monkeypatch.setenv("LMD_LLM_MAX_ATTEMPTS", "2")
    for _ in range(2):
        llm_env.enqueue_status(500, message="boom")
    assert main(["plan", "a cat"]) == 2
    retry, error = capsys.readouterr().err.strip().splitlines()  # the retry is shown as it happens, then one error line
    assert retry == f"lmd plan: {llm_env.base_url}: HTTP 500; attempt 1 of 2, next in " + retry.split("next in ")[1]
    assert error.startswith("lmd plan: error: LLM endpoint") and "HTTP 500 after 2 attempts: boom" in error
    assert main(["plan", "a cat\x00"]) == 2
    assert "control character U+0000" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert "give a PROMPT" in capsys.readouterr().err


def test_plan_revise(llm_env, tmp_path, capsys):
    first = Layout.model_validate({"objects": [{"id": "cat", "phrase": "a cat", "box": [0.1, 0.1, 0.3, 0.3]}, {"id": "dog", "phrase": "a dog", "box": [0.5, 0.5, 0.9, 0.9]}]})
    path = tmp_path / "first.json"
    path.write_text(first.model_dump_json())
    llm_env.enqueue("[('a cat', [300, 50, 102, 102]), ('a dog', [256, 256, 205, 205])]\nBackground prompt: a yard")
    assert main(["plan", "a cat and a dog", "--revise", str(path), "--instruction", "move the cat to the right"]) == 0
    layout = Layout.model_validate_json(capsys.readouterr().out)
    assert [o.id for o in layout.objects] == ["cat", "dog"]
    assert layout.object("dog").box == first.object("dog").box
    assert llm_env.requests[0].last_user_content == "Instruction: move the cat to the right"
    path.write_text("{}")
    assert main(["plan", "a cat", "--revise", str(path), "--instruction", "x"]) == 0  # an empty layout is a layout
    path.write_text('{"objects": 3}')
    assert main(["plan", "a cat", "--revise", str(path), "--instruction", "x"]) == 2
    assert "is not a layout" in capsys.readouterr().err


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_mode_records_failures_and_resumes(llm_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LMD_LLM_MAX_ATTEMPTS", "1")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"index": 7, "task": "numeracy", "prompt": "two cats"}, {"index": 8, "prompt": "a dog"}, {"index": 9, "prompt": "two cats"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "layouts.jsonl"
    llm_env.enqueue_status(503)  # the first prompt fails; the others get the default layout
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out)]) == 1
    lines = _lines(out)
    assert [line["index"] for line in lines] == [7, 8, 9]
    assert lines[0]["error_type"] == "LLMUnavailable" and "HTTP 503" in lines[0]["error"] and "layout" not in lines[0]
    assert [line["sample_index"] for line in lines] == [0, 0, 1]  # a repeated prompt is another sample
    assert Layout.model_validate(lines[1]["layout"]).phrases() == ["a cat"]
    err = capsys.readouterr().err
    assert "planned 2, failed 1, already done 0" in err and "planning" in err  # the tqdm bar went to stderr

    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out)]) == 0
    assert len(llm_env.requests) == 4  # only the failed prompt was asked again
    lines = _lines(out)
    assert len(lines) == 4 and lines[-1]["index"] == 7 and "layout" in lines[-1]
    assert "planned 1, failed 0, already done 2" in capsys.readouterr().err
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out)]) == 0
    assert len(llm_env.requests) == 4


def test_batch_mode_input_errors(llm_env, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"index": 1}\n')
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert 'no "prompt" string' in capsys.readouterr().err
    assert main(["plan", "--prompts-file", str(prompts)]) == 2
    assert "needs both --prompts-file and --out" in capsys.readouterr().err


def test_lmd_plan_runs_as_a_process_without_torch(fake_llm, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMD_")}
    env.update(fake_llm.env())
    code = "import sys; from lmd.cli import main; rc = main(); print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)"
    result = subprocess.run(
        [sys.executable, "-c", code, "plan", "a cat"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert Layout.model_validate_json(result.stdout).phrases() == ["a cat"]
    assert result.stderr.strip().endswith("False")  # lmd plan never imported torch
