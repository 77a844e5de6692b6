"""The operator's names (LMD_MODELS, LMD_LORAS, LMD_WORKER_MODEL): settings checks, how the
wiring resolves them, and which queues ``lmd worker`` serves. No models load here."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from jobs.queue import queue_names, render_queue
from lmd import wiring
from lmd.cli import CLIError
from lmd.commands.service import worker_queues
from tests.support.builders import plain_settings

MODELS = {"sd15": "org/sd15", "local": "/models/sd21", "file": "/models/x.safetensors"}


def test_names_must_be_queue_safe_and_the_worker_model_listed():
    with pytest.raises(ValidationError, match="LMD_MODELS: name 'a b' must be"):
        plain_settings(models={"a b": "x/y"})
    with pytest.raises(ValidationError, match="LMD_LORAS: name '-x' must be"):
        plain_settings(loras={"-x": "/l.safetensors"})
    with pytest.raises(ValidationError, match="LMD_WORKER_MODEL 'other' is not a name of LMD_MODELS"):
        plain_settings(models=MODELS, worker_model="other")


def test_the_default_model_and_a_requests_model():
    alone = plain_settings(sd_model="org/only")
    assert wiring.default_model(alone) == "org/only" and wiring.request_model(alone, None) is None
    with pytest.raises(wiring.UnknownName, match="this service renders one model"):
        wiring.request_model(alone, "sd15")
    listed = plain_settings(models=MODELS)
    assert wiring.default_model(listed) == "org/sd15" and wiring.request_model(listed, None) == "sd15"
    assert wiring.default_model(listed.model_copy(update={"worker_model": "local"})) == "/models/sd21"
    assert wiring.model_source(listed, "file") == "/models/x.safetensors" and wiring.model_source(listed, "a/b") == "a/b"
    with pytest.raises(wiring.UnknownName, match="unknown model 'x'; choose one of: sd15, local, file"):
        wiring.request_model(listed, "x")
    assert wiring.pipeline_arguments(listed, model="local")["model"] == "/models/sd21"


def test_loras_resolve_to_files_with_weights():
    settings = plain_settings(loras={"ink": "/l/ink.safetensors"})
    [choice] = wiring.lora_choices(settings, [("ink", 0.5)])
    assert (choice.name, choice.path, choice.weight) == ("ink", "/l/ink.safetensors", 0.5)
    with pytest.raises(wiring.UnknownName, match="unknown LoRA 'x'; this service has: ink"):
        wiring.lora_choices(settings, [("x", 1.0)])
    with pytest.raises(wiring.UnknownName, match="none \\(LMD_LORAS is empty\\)"):
        wiring.lora_choices(plain_settings(), [("ink", 1.0)])


def test_queues_per_model(monkeypatch):
    monkeypatch.setenv("LMD_WORKER_MODEL", "")  # recorded as absent, so what worker_queues sets is undone after
    monkeypatch.delenv("LMD_WORKER_MODEL")
    assert queue_names(plain_settings()) == ["plan", "render"]
    listed = plain_settings(models=MODELS)
    assert queue_names(listed) == ["plan", "render.sd15", "render.local", "render.file"]
    assert render_queue(None) == "render" and render_queue("local") == "render.local"
    assert worker_queues(plain_settings(), "plan,render", None) == ["plan", "render"]
    assert worker_queues(listed, "render", None) == ["render.sd15"] and os.environ["LMD_WORKER_MODEL"] == "sd15"
    assert worker_queues(listed, "render", "local") == ["render.local"] and os.environ["LMD_WORKER_MODEL"] == "local"
    assert worker_queues(listed, "render.file", None) == ["render.file"]


@pytest.mark.parametrize(("settings", "queues", "model", "message"), [
    ({}, "render", "sd15", "LMD_MODELS is unset"),
    ({"models": MODELS}, "render", "nope", "unknown model 'nope'; LMD_MODELS has: sd15, local, file"),
    ({"models": MODELS}, "render.sd15", "local", "name different models"),
    ({"models": MODELS}, "plan", "sd15", "--model is for render workers"),
    ({"models": MODELS}, "render.sd15,render.local", None, "a render worker serves one model"),
    ({}, "paint", None, "--queues must name plan, render"),
])
def test_worker_queue_errors_are_one_line(monkeypatch, settings, queues, model, message):
    monkeypatch.setenv("LMD_WORKER_MODEL", "")  # recorded as absent, so what worker_queues sets is undone after
    monkeypatch.delenv("LMD_WORKER_MODEL")
    with pytest.raises(CLIError, match=message):
        worker_queues(plain_settings(**settings), queues, model)
