"""A render this server cannot run is refused when the job is accepted (422), before a plan worker
could spend an LLM call on it: nothing is queued, and the answer names no path."""

from __future__ import annotations

import shutil

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from tests.support.service import service_settings


@pytest.fixture
def client_and_queue(private_redis, tmp_path, tiny_conditioning_files, tiny_sd_path):
    model = tmp_path / "config-only"  # the UNet's config alone: the check reads no weights
    (model / "unet").mkdir(parents=True)
    shutil.copy(tiny_sd_path / "unet" / "config.json", model / "unet" / "config.json")
    settings = service_settings(private_redis.url, tmp_path / "data", sd_model=str(model),
                                gluenet_checkpoints={"fr": str(tiny_conditioning_files["gluenet_fr"])},
                                gluenet_xlmr=str(tiny_conditioning_files["xlmr"]),
                                ella_checkpoint="/srv/models/missing-ella.safetensors")
    queue = redis.Redis(port=private_redis.port)
    queue.flushdb()
    with TestClient(create_app(settings)) as client:
        yield client, queue


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt": "ein roter Hund in einem Park", "conditioning": "gluenet"}, "conditioning",
         "conditioning gluenet has no checkpoint on this server for the prompt's language 'de' (it has: fr)"),
        ({"prompt": "a red dog", "conditioning": "ella"}, "conditioning",
         "conditioning ella is not available on this server (its files are not installed)"),
        ({"prompt": "a red dog", "variant": "lmd_plus"}, "variant",
         "variant lmd_plus needs a GLIGEN model; the model on this server has none"),
    ],
)
def test_what_cannot_render_is_refused_before_anything_is_queued(client_and_queue, body, field, message):
    client, queue = client_and_queue
    response = client.post("/generate", json={**body, "width": 64, "height": 64})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field] and error["msg"].startswith(message)
    assert "/srv/models" not in response.text and "config-only" not in response.text  # no server path reaches the client
    assert queue.llen("plan") == 0 and queue.llen("render") == 0


def test_what_can_render_is_queued(client_and_queue):
    client, queue = client_and_queue
    for body in ({"prompt": "un chien rouge dans un parc", "conditioning": "gluenet"}, {"prompt": "a red dog"}):
        assert client.post("/generate", json={**body, "width": 64, "height": 64}).status_code == 202
    assert queue.llen("plan") == 2
    planned = client.post("/plan", json={"prompt": "a red dog", "variant": "lmd_plus", "width": 64, "height": 64})
    assert planned.status_code == 422  # a plan's settings are the ones its session renders with later
    assert queue.llen("plan") == 2
