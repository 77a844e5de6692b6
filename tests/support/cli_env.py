"""The environment of in-process CLI tests: no LMD_* variables or .env from the machine."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No stray LMD_* variables or .env file (the working directory is ``tmp_path``); one torch thread."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("LMD_") or n == "OPENAI_API_KEY"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LMD_TORCH_THREADS", "1")
    return tmp_path
