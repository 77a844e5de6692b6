"""``lmd worker`` / ``lmd serve`` argument errors: one line, exit status 2, nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmd.cli import main


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["worker", "--queues", "gpu"], "--queues must name plan, render (or render.NAME) or both"),
        (["worker", "--queues", ","], "--queues must name plan, render (or render.NAME) or both"),
        (["worker", "--queues", "render", "--concurrency", "2"], "one process per GPU"),
        (["worker", "--queues", "plan", "--concurrency", "0"], "at least 1"),
    ],
)
def test_worker_argument_errors_are_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("lmd worker: error:")


def test_the_api_and_the_worker_main_process_do_not_import_torch():
    """No CUDA state can exist in a parent before it forks the render child."""
    code = "import sys, api.main, worker.tasks, lmd.commands.service; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"LMD_PRESET": "turbo"}, "lmd worker: error: invalid setting LMD_PRESET: Input should be 'reference' or 'fast'"),
        ({"LMD_MIN_SIZE": "2000"}, "lmd worker: error: invalid settings: LMD_MIN_SIZE must not exceed LMD_MAX_SIZE"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(env, words, monkeypatch, capsys):
    from lmd.settings import get_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert main(["worker", "--queues", "plan"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.strip() == words
