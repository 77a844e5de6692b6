"""``lmd plan`` when things go wrong: no key, nothing listening, 401, unknown model, bad --draw, Ctrl-C in batch mode."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layout_planner import Layout
from lmd.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No LMD_* or OPENAI_API_KEY from the machine; an empty working directory (no .env)."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("LMD_") or n == "OPENAI_API_KEY"]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def llm_env(fake_llm, clean_env):
    for name, value in fake_llm.env().items():
        clean_env.setenv(name, value)
    return fake_llm


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_api_key_for_openai_fails_at_once_in_one_line(clean_env, capsys):
    clean_env.setenv("LMD_PLANNER", "remote")  # auto would pick the local planner without a key
    assert main(["plan", "a cat"]) == 2  # default base URL: api.openai.com, no key anywhere
    err = capsys.readouterr().err
    assert err == (
        "lmd plan: error: no API key for https://api.openai.com/v1: set LMD_LLM_API_KEY or OPENAI_API_KEY, "
        "or LMD_LLM_BASE_URL to a server that needs none\n"
    )  # no retry lines: nothing was sent


def test_connection_refused_is_one_line_at_once(clean_env, capsys):
    """Nothing listening: one probe, no retries (the service's planner still retries), one line."""
    port = _closed_port()
    clean_env.setenv("LMD_LLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    clean_env.setenv("LMD_LLM_MAX_ATTEMPTS", "3")
    clean_env.setenv("LMD_LLM_BACKOFF_S", "0.01")
    assert main(["plan", "a cat"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"lmd plan: error: cannot reach LLM endpoint http://127.0.0.1:{port}/v1 (model gpt-4o-mini)")
    assert "Connection refused" in lines[0]


@pytest.mark.parametrize(
    "status, message, hint",
    [
        (401, "Incorrect API key provided: sk-abc***", "(check the API key)"),
        (404, "The model `gpt-9` does not exist or you do not have access to it.", "(check the model name, and that the base URL is the API root, usually ending in /v1)"),
    ],
)
def test_a_refused_request_is_one_line_with_a_hint_and_no_retry(llm_env, capsys, status, message, hint):
    llm_env.enqueue_status(status, message=message)
    assert main(["plan", "a cat"]) == 2
    err = capsys.readouterr().err
    assert err == f"lmd plan: error: LLM endpoint {llm_env.base_url} (model fake-model) refused the request with HTTP {status}: {message} {hint}\n"
    assert len(llm_env.requests) == 1


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing/layout.png", "the directory missing does not exist"),
        ("layout", "unknown image type '(no extension)'; use a .png name"),
        (".", "is a directory"),
    ],
)
def test_a_bad_draw_path_is_refused_before_asking_the_llm(llm_env, capsys, name, message):
    assert main(["plan", "--draw", name, "a cat"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"lmd plan: error: --draw {name}: {message}\n" and captured.out == ""
    assert llm_env.requests == []


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_ctrl_c_in_batch_mode_keeps_whole_lines_and_resumes(fake_llm, clean_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"index": i, "prompt": f"cat number {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "layouts.jsonl"
    for delay_s in (0.4, 0.4, 8.0, 8.0, 8.0, 8.0):
        fake_llm.enqueue_timeout(delay_s)  # slow but successful answers (the client waits 10 s): the
        # SIGINT lands while the third waits, even on a machine busy enough to stall this loop for seconds
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMD_")}
    env.update(fake_llm.env(), LMD_LLM_TIMEOUT_S="10", PYTHONPATH=str(ROOT))
    # A terminal's Ctrl-C reaches a process whose SIGINT is not ignored; a child inherits an
    # ignored SIGINT from its parent (and Python then installs no KeyboardInterrupt handler), so the
    # child is started while this process handles SIGINT, whatever an earlier test left.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmd", "plan", "--prompts-file", str(prompts), "--out", str(out)],
            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # while it waits for a later answer
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "lmd plan: interrupted: planned" in err and "run the same command again to resume" in err
    written = _lines(out)  # every line whole and valid
    assert 2 <= len(written) < 6 and all(Layout.model_validate(line["layout"]) for line in written)

    done = len(fake_llm.requests)
    fake_llm.replies.clear()  # the resumed run gets prompt answers
    for name, value in fake_llm.env().items():
        clean_env.setenv(name, value)
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out)]) == 0  # resumes where it stopped
    lines = _lines(out)
    assert sorted(line["index"] for line in lines) == list(range(6))
    asked_again = {r.last_user_content for r in fake_llm.requests[done:]}
    assert not asked_again & {f"Caption: {line['prompt']}" for line in written}  # nothing written is asked again


def test_a_torn_last_line_is_dropped_before_resuming(llm_env, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"index": i, "prompt": "a cat"}) + "\n" for i in range(3)))
    out = tmp_path / "layouts.jsonl"
    whole = json.dumps({"index": 0, "prompt": "a cat", "sample_index": 0, "layout": {"objects": []}})
    out.write_text(whole + "\n" + whole[:25])  # a run killed in the middle of a write
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out)]) == 0
    assert "dropped an incomplete last line (25 bytes)" in capsys.readouterr().err
    assert [line["index"] for line in _lines(out)] == [0, 1, 2]
    assert len(llm_env.requests) == 2
