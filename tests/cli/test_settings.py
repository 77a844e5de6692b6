"""The one settings object: env prefix, the OPENAI_API_KEY fallback, and README coverage."""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from lmd.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_env_prefix_and_openai_key_fallback(monkeypatch):
    monkeypatch.setenv("LMD_LLM_MODEL", "local-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")
    monkeypatch.delenv("LMD_LLM_API_KEY", raising=False)
    settings = Settings(_env_file=None)
    assert settings.llm_model == "local-model"
    assert settings.llm_api_key.get_secret_value() == "sk-from-openai-env"
    monkeypatch.setenv("LMD_LLM_API_KEY", "sk-own")
    assert Settings(_env_file=None).llm_api_key.get_secret_value() == "sk-own"


def test_inconsistent_limits_are_refused(monkeypatch):
    monkeypatch.setenv("LMD_TASK_SOFT_TIME_LIMIT_S", "700")
    monkeypatch.setenv("LMD_TASK_TIME_LIMIT_S", "600")
    with pytest.raises(ValidationError, match="LMD_TASK_TIME_LIMIT_S"):
        Settings(_env_file=None)


def test_every_setting_is_documented_in_the_readme_with_its_default():
    text = README.read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(LMD_[A-Z0-9_]+)` \| `([^`]*)` \|", text, re.M)}
    for name, field in Settings.model_fields.items():
        env = f"LMD_{name.upper()}"
        assert env in rows, f"{env} is not in the README's settings table"
        default = field.default_factory() if field.default_factory is not None else field.default
        assert rows[env] == str(default), f"{env}: README says {rows[env]!r}, the code {default!r}"


def test_two_segmenters_at_once_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("LMD_SEGMENTER", "shapes")
    assert Settings(_env_file=None).segmenter == "shapes"
    monkeypatch.setenv("LMD_SAM_CHECKPOINT", str(tmp_path / "sam_vit_b.pth"))
    with pytest.raises(ValidationError, match="LMD_SEGMENTER=shapes and LMD_SAM_CHECKPOINT"):
        Settings(_env_file=None)
