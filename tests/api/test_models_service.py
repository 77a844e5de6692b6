"""Several models and LoRA adapters in one service, as deployed: a private Redis, the API in
process, and two real ``lmd worker`` render processes, one per model (queues render.alpha and
render.beta). A job goes to the worker of the model it names (the first by default); its
adapters apply to its own render only, on a worker that keeps them loaded; unknown names are
422 ``{code, detail}``; /limits and /readyz list the models."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from tests.support.builders import box_object, layout_data
from tests.support.service import WorkerProcess, service_settings, settings_env, wait_for_job
from tests.support.tiny_sd import build_tiny_sd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two worker processes load models on a shared CPU

LAYOUT = layout_data(box_object("ball", "a red ball", [0.2, 0.2, 0.7, 0.7]), background="a park")
SMALL = {"layout": LAYOUT, "width": 64, "height": 64, "steps": 3, "seed": 9, "preset": "fast"}


@pytest.fixture(scope="module")
def stack(private_redis, tiny_sd_path, tiny_loras, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    beta = build_tiny_sd(tmp / "beta-model", seed=3)  # other weights: other images
    settings = service_settings(
        private_redis.url, tmp / "data", device="cpu", dtype="float32", torch_threads=1, heartbeat_s=0.3,
        models={"alpha": str(tiny_sd_path), "beta": str(beta)}, loras={"ink": str(tiny_loras["ink"])},
    )
    env = settings_env(settings)
    client_redis = redis.Redis(port=private_redis.port)
    workers = [WorkerProcess(f"render.{name}", env, tmp / f"{name}.log") for name in ("alpha", "beta")]
    try:
        for worker in workers:
            worker.wait_ready(client_redis, timeout_s=120)
        with TestClient(create_app(settings)) as client:
            yield client, settings, workers
    finally:
        for worker in workers:
            worker.stop()


def run(client, **body) -> tuple[dict, np.ndarray, dict]:
    accepted = client.post("/generate", json={**SMALL, **body})
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["job_id"], {"succeeded", "failed"}, timeout_s=180)
    assert job["state"] == "succeeded", job
    image = client.get(f"/jobs/{job['job_id']}/image")
    report = client.get(f"/jobs/{job['job_id']}/report").json()
    return job, np.asarray(Image.open(io.BytesIO(image.content)).convert("RGB"), dtype=np.int16), report


def test_each_job_renders_on_the_worker_of_its_model(stack):
    client, settings, _ = stack
    default, default_image, default_report = run(client)
    beta, beta_image, beta_report = run(client, model="beta")
    assert default["model"] == "alpha" and beta["model"] == "beta"
    assert default_report["model"] == settings.models["alpha"] and beta_report["model"] == settings.models["beta"]
    assert np.abs(default_image - beta_image).max() > 10


def test_adapters_apply_to_their_job_only_on_a_worker_that_keeps_them(stack):
    client, settings, workers = stack
    _, plain, _ = run(client, model="beta")
    styled_job, styled, styled_report = run(client, model="beta", loras=[{"name": "ink", "weight": 0.8}])
    _, plain_again, plain_report = run(client, model="beta")
    assert np.abs(plain - styled).max() > 10
    assert np.array_equal(plain, plain_again)  # the same worker process, the adapter switched off again
    assert styled_job["loras"] == [{"name": "ink", "weight": 0.8}]
    assert styled_report["loras"] == [{"name": "ink", "weight": 0.8}] and plain_report["loras"] == []
    log = workers[1].log_path.read_text(errors="replace")
    assert log.count(f"loading {settings.models['beta']} on") == 1  # one model load in this worker: never swapped per job


@pytest.mark.parametrize(("body", "code", "named"), [
    ({"model": "gamma"}, "unknown_model", "unknown model 'gamma'; choose one of: alpha, beta"),
    ({"loras": [{"name": "chalk"}]}, "unknown_lora", "unknown LoRA 'chalk'; this service has: ink"),
])
def test_unknown_names_are_422_with_a_code(stack, body, code, named):
    client, _, _ = stack
    answer = client.post("/generate", json={**SMALL, **body})
    assert answer.status_code == 422 and answer.json() == {"code": code, "detail": answer.json()["detail"]}
    assert answer.json()["detail"].startswith(named)
    assert "/" not in answer.json()["detail"]  # no paths


def test_an_adapter_named_twice_is_a_validation_error_and_the_schema_names_the_choices(stack):
    client, _, _ = stack
    answer = client.post("/generate", json={**SMALL, "loras": [{"name": "ink"}, {"name": "ink", "weight": 0.5}]})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "loras"]
    assert "LoRA 'ink' is named twice" in answer.json()["detail"][0]["msg"]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["LoraRequest"]["properties"]["name"]["enum"] == ["ink"]
    assert {"enum": ["alpha", "beta"]}.items() <= next(b for b in schemas["GenerateRequest"]["properties"]["model"]["anyOf"]
                                                       if b.get("type") == "string").items()


def test_limits_and_readiness_list_the_models_and_adapters(stack):
    client, _, _ = stack
    limits = client.get("/limits").json()
    assert limits["models"] == ["alpha", "beta"] and limits["model"] == "alpha" and limits["loras"] == ["ink"]
    assert {name: c["model_name"] for name, c in limits["render_by_model"].items()} == {"alpha": "alpha", "beta": "beta"}
    assert limits["render_by_model"]["beta"]["loras"] == ["ink"] and limits["render_workers"] == 2
    ready = client.get("/readyz").json()
    assert ready["worker_counts"] == {"plan": 0, "render.alpha": 1, "render.beta": 1}
    assert ready["queues_without_workers"] == ["plan"]
    dumped = json.dumps(limits)
    assert "/tmp" not in dumped and "/tiny" not in dumped  # directory names only, never paths
