"""The HTTP contract without workers: validation, 404s, idempotency, cancel of a queued job, auth.

The API runs in-process against a private Redis; jobs stay queued (no worker consumes them),
which is exactly the state these rules are about.
"""

from __future__ import annotations

import json

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from tests.support.builders import box_object, layout_data
from tests.support.service import RedisServer, service_settings

LAYOUT = layout_data(box_object(box=[0.1, 0.2, 0.5, 0.8]), background="a living room")


@pytest.fixture(scope="module")
def client(private_redis, tmp_path_factory):
    settings = service_settings(private_redis.url, tmp_path_factory.mktemp("data"), max_objects=2)
    with TestClient(create_app(settings)) as c:
        yield c


def _fields(response) -> list[str]:
    assert response.status_code == 422, response.text
    return [".".join(str(p) for p in e["loc"][1:]) for e in response.json()["detail"]]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"prompt": "a cat", "steps": 0}, "steps", "1..400"),
        ({"prompt": "a cat", "steps": 401}, "steps", "LMD_MAX_STEPS"),
        ({"prompt": "a cat", "width": 100}, "width", "multiple of 8"),
        ({"prompt": "a cat", "height": 16}, "height", "32..128"),
        ({"prompt": "a cat", "seed": -1}, "seed", "LMD_MAX_SEED"),
        ({"prompt": "   "}, "prompt", "required"),
        ({}, "prompt", "required"),
        ({"prompt": "x" * 2001}, "prompt", "LMD_MAX_PROMPT_CHARS"),
        ({"prompt": "a cat", "sizee": 64}, "sizee", "Extra inputs"),
        ({"prompt": "a cat", "guidance_scale": -1}, "guidance_scale", "greater than or equal"),
        ({"prompt": "a cat", "variant": "dalle"}, "variant", "lmd"),
        ({"prompt": "a cat", "preset": "slow"}, "preset", "reference"),
        ({"prompt": "a cat", "refine": True}, "refine", "LMD_REFINER is unset"),
        ({"layout": {"objects": [box_object("a", box=[0.5, 0.5, 0.2, 0.9])]}}, "layout.objects.0.box", "zero area"),
    ],
)
def test_invalid_generate_bodies_are_422_naming_the_field(client, body, field, words):
    response = client.post("/generate", json={"width": 64, "height": 64, **body})
    assert field in _fields(response)
    assert words in response.text


def test_too_many_layout_objects_names_the_limit(client):
    objects = [{"id": f"o{i}", "phrase": "a ball", "box": [0.1 * i, 0.1, 0.1 * i + 0.05, 0.2]} for i in range(3)]
    response = client.post("/generate", json={"layout": {"objects": objects}, "width": 64, "height": 64})
    assert _fields(response) == ["layout"]
    assert "LMD_MAX_OBJECTS" in response.text


def test_generate_creates_a_queued_job_in_a_new_session(client):
    response = client.post("/generate", json={"prompt": "a cat on a mat", "width": 64, "height": 64, "steps": 3, "seed": 7})
    assert response.status_code == 202
    accepted = response.json()
    job = client.get(accepted["status_url"]).json()
    assert job["state"] == "queued" and job["progress"]["stage"] == "queued"
    assert (job["seed"], job["steps"], job["width"], job["prompt"]) == (7, 3, 64, "a cat on a mat")
    assert job["layout"] is None and job["result"] is None and job["error"] is None
    assert job["refine"] is None  # unset: the worker refines when it has a refiner
    session = client.get(f"/sessions/{accepted['session_id']}").json()
    assert session["seed"] == 7
    assert [(t["turn"], t["kind"], t["job_id"], t["state"]) for t in session["turns"]] == [
        (1, "generate", accepted["job_id"], "queued")
    ]


def test_a_given_layout_is_stored_and_a_second_generate_joins_the_session(client):
    first = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()
    second = client.post("/generate", json={"layout": LAYOUT, "session_id": first["session_id"], "width": 64, "height": 64})
    assert second.status_code == 202 and second.json()["turn"] == 2
    job = client.get(second.json()["status_url"]).json()
    assert job["layout"]["objects"][0]["phrase"] == "a cat"
    assert job["seed"] == client.get(f"/sessions/{first['session_id']}").json()["seed"]


def test_unknown_ids_are_404(client):
    for path in ("/jobs/nope", "/jobs/nope/image", "/jobs/nope/overlay", "/jobs/nope/events", "/sessions/nope"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "not found" in response.json()["detail"]
    assert client.post("/jobs/nope/cancel").status_code == 404
    assert client.post("/sessions/nope/instruct", json={"instruction": "add a dog"}).status_code == 404
    assert client.post("/generate", json={"prompt": "a cat", "session_id": "nope", "width": 64, "height": 64}).status_code == 404


def test_idempotent_retry_returns_the_same_job_and_another_body_is_409(client):
    body = {"prompt": "two apples on a table", "width": 64, "height": 64}
    key = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/generate", json=body, headers=key)
    again = client.post("/generate", json=body, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    session = client.get(f"/sessions/{first.json()['session_id']}").json()
    assert len(session["turns"]) == 1  # the retry created nothing
    other = client.post("/generate", json={**body, "prompt": "three apples"}, headers=key)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    fresh = client.post("/generate", json=body, headers={"Idempotency-Key": "retry-me-2"})
    assert fresh.json()["job_id"] != first.json()["job_id"]


def test_cancel_of_a_queued_job_ends_it_canceled_and_a_second_cancel_is_409(client):
    job_id = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()["job_id"]
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["state"] == "canceled"
    assert response.json()["error"]["code"] == "canceled"
    assert client.get(f"/jobs/{job_id}").json()["state"] == "canceled"
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 409
    image = client.get(f"/jobs/{job_id}/image")
    assert image.status_code == 409 and "canceled" in image.json()["detail"]


def test_events_of_a_finished_job_send_its_state_and_end(client):
    job_id = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()["job_id"]
    client.post(f"/jobs/{job_id}/cancel")
    with client.stream("GET", f"/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    events = [block for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
    assert [e.splitlines()[0] for e in events] == ["event: state", "event: end"]
    assert '"state":"canceled"' in events[0]
    assert json.loads(events[1].splitlines()[1].removeprefix("data: ")) == {"job_id": job_id, "state": "canceled"}


def test_instruct_needs_a_finished_succeeded_turn(client):
    accepted = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()
    busy = client.post(f"/sessions/{accepted['session_id']}/instruct", json={"instruction": "add a dog"})
    assert busy.status_code == 409 and "still queued" in busy.json()["detail"]
    client.post(f"/jobs/{accepted['job_id']}/cancel")
    nothing = client.post(f"/sessions/{accepted['session_id']}/instruct", json={"instruction": "add a dog"})
    assert nothing.status_code == 409 and "no succeeded turn" in nothing.json()["detail"]
    empty = client.post(f"/sessions/{accepted['session_id']}/instruct", json={"instruction": " "})
    assert _fields(empty) == ["instruction"]


def test_health_readiness_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["redis"] == "ok" and ready["queues_without_workers"] == ["plan", "render"]
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/generate", "/jobs/{job_id}", "/jobs/{job_id}/image", "/jobs/{job_id}/overlay",
                 "/jobs/{job_id}/cancel", "/jobs/{job_id}/events", "/sessions/{session_id}",
                 "/sessions/{session_id}/instruct", "/healthz", "/readyz"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_records_expire_after_the_retention(client, private_redis):
    accepted = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()
    raw = redis.Redis(port=private_redis.port)
    retention = client.app.state.settings.retention_s
    for key in (f"lmd:job:{accepted['job_id']}", f"lmd:session:{accepted['session_id']}"):
        assert 0 < raw.ttl(key) <= retention


def test_generate_enqueues_plan_then_render_and_a_layout_render_only(client, private_redis):
    raw = redis.Redis(port=private_redis.port)
    before = raw.llen("plan"), raw.llen("render")
    client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64})
    client.post("/generate", json={"layout": LAYOUT, "width": 64, "height": 64})
    assert (raw.llen("plan"), raw.llen("render")) == (before[0] + 1, before[1] + 1)


@pytest.fixture(scope="module")
def keyed_client(private_redis, tmp_path_factory):
    settings = service_settings(private_redis.url, tmp_path_factory.mktemp("data"), api_keys=["key-a", "key-b"])
    with TestClient(create_app(settings)) as c:
        yield c


def test_api_keys_401_without_a_valid_key(keyed_client):
    body = {"prompt": "a cat", "width": 64, "height": 64}
    missing = keyed_client.post("/generate", json=body)
    assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = keyed_client.post("/generate", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
    assert keyed_client.get("/healthz").status_code == 200


def test_a_key_sees_only_its_own_jobs_and_sessions(keyed_client):
    a = {"Authorization": "Bearer key-a"}
    b = {"X-API-Key": "key-b"}
    accepted = keyed_client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}, headers=a).json()
    assert keyed_client.get(f"/jobs/{accepted['job_id']}", headers=a).status_code == 200
    assert keyed_client.get(f"/jobs/{accepted['job_id']}", headers=b).status_code == 404
    assert keyed_client.get(f"/sessions/{accepted['session_id']}", headers=b).status_code == 404
    assert keyed_client.post(f"/jobs/{accepted['job_id']}/cancel", headers=b).status_code == 404
    joined = keyed_client.post("/generate", json={"prompt": "a dog", "session_id": accepted["session_id"],
                                                  "width": 64, "height": 64}, headers=b)
    assert joined.status_code == 404
    # The same Idempotency-Key under two keys are two jobs.
    body = {"prompt": "a bird", "width": 64, "height": 64}
    one = keyed_client.post("/generate", json=body, headers={**a, "Idempotency-Key": "k"}).json()
    two = keyed_client.post("/generate", json=body, headers={**b, "Idempotency-Key": "k"}).json()
    assert one["job_id"] != two["job_id"]


def test_a_full_queue_is_429_with_retry_after_and_frees_up_when_a_job_ends(tmp_path):
    server = RedisServer().start()
    try:
        settings = service_settings(server.url, tmp_path, max_active_jobs=2, retry_after_s=4)
        with TestClient(create_app(settings)) as c:
            body = {"prompt": "a cat", "width": 64, "height": 64}
            first = c.post("/generate", json=body, headers={"Idempotency-Key": "one"})
            assert c.post("/generate", json=body).status_code == 202
            full = c.post("/generate", json=body)
            assert full.status_code == 429 and full.headers["retry-after"] == "4"
            assert "LMD_MAX_ACTIVE_JOBS" in full.json()["detail"]
            replay = c.post("/generate", json=body, headers={"Idempotency-Key": "one"})  # a retry is not new work
            assert replay.status_code == 202 and replay.json()["job_id"] == first.json()["job_id"]
            c.post(f"/jobs/{first.json()['job_id']}/cancel")
            assert c.post("/generate", json=body).status_code == 202
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"prompt": "a cat", "guidance_scale": NaN}', "guidance_scale"),
        (b'{"prompt": "a cat", "guidance_scale": Infinity}', "guidance_scale"),
        (b'{"prompt": "a cat", "seed": 1e400}', "seed"),
        (b'{"layout": {"objects": [{"id": "c", "phrase": "a cat", "box": [NaN, 0.1, 0.3, 0.4]}]}}', "layout.objects.0.box"),
        (b'{"prompt": "a \\ud800 cat"}', "prompt"),
        (b'{"prompt": "a cat\\u0000 on a mat"}', "prompt"),
        (b'{"prompt": "a cat", "negative_prompt": "\\u001b[31mblurry"}', "negative_prompt"),
        (b'{"layout": {"objects": [{"id": "c", "phrase": "a \\udfff cat", "box": [0.1, 0.1, 0.3, 0.4]}]}}', "layout.objects.0.phrase"),
        (b'{"prompt": "a cat", "session_id": "a\\u0007b"}', "session_id"),
    ],
)
def test_values_json_cannot_echo_or_store_are_422_not_500(client, raw, field):
    """NaN/Infinity/1e400 and lone surrogates broke the 422 (or the record) with a 500; control characters passed."""
    response = client.post("/generate", content=raw[:-1] + b', "width": 64, "height": 64}',
                           headers={"content-type": "application/json"})
    assert field in _fields(response)


def test_a_422_echoes_a_huge_value_shortened_and_a_404_a_huge_id_shortened(client):
    phrase = "x" * 100_000
    response = client.post("/generate", json={"layout": {"objects": [box_object("c", phrase, [0.1, 0.1, 0.3, 0.4])]}})
    assert _fields(response) == ["layout.objects.0.phrase"]
    assert len(response.content) < 2000
    missing = client.get("/jobs/" + "y" * 5000)
    assert missing.status_code == 404 and len(missing.content) < 300


def test_unicode_and_newlines_in_a_prompt_are_kept(client):
    prompt = "un chat 🐈 sur un tapis,\nà côté d'un 猫"
    accepted = client.post("/generate", json={"prompt": prompt, "width": 64, "height": 64})
    assert accepted.status_code == 202
    assert client.get(accepted.json()["status_url"]).json()["prompt"] == prompt


def test_preset_and_variant_default_to_the_settings_and_a_request_overrides_them(private_redis, tmp_path):
    settings = service_settings(private_redis.url, tmp_path, preset="fast", variant="sd")
    with TestClient(create_app(settings)) as c:
        unset = c.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()
        given = c.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64,
                                          "preset": "reference", "variant": "lmd_plus"}).json()
        assert [(j["preset"], j["variant"]) for j in (c.get(unset["status_url"]).json(), c.get(given["status_url"]).json())] == [
            ("fast", "sd"), ("reference", "lmd_plus")]


def _metrics(client) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_unfinished_jobs_by_state_and_finished_ones(client):
    queued, canceled = ("lmd_jobs", (("state", "queued"),)), ("lmd_jobs_finished_total", (("state", "canceled"),))
    before = _metrics(client)
    job_id = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()["job_id"]
    middle = _metrics(client)
    assert middle[queued] == before[queued] + 1
    client.post(f"/jobs/{job_id}/cancel")
    after = _metrics(client)
    assert (after[queued], after[canceled]) == (before[queued], before[canceled] + 1)
    assert after[("lmd_render_seconds_count", ())] == 0 and after[("lmd_workers", (("queue", "render"),))] == 0


def test_every_field_of_the_service_contract_is_there_by_name(client):
    """docs/service.md "HTTP contract": the names clients are written against."""
    accepted = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}).json()
    assert {"job_id", "session_id", "status_url"} <= accepted.keys()
    job = client.get(accepted["status_url"]).json()
    assert {"job_id", "session_id", "state", "progress", "prompt", "layout", "seed", "error", "result",
            "created_at", "updated_at"} <= job.keys()
    assert set(job["progress"]) == {"stage", "step", "total", "preview"}
    session = client.get(f"/sessions/{accepted['session_id']}").json()
    assert {"session_id", "turns"} <= session.keys()
    assert {"turn", "kind", "text", "layout", "job_id"} <= session["turns"][0].keys()
    canceled = client.post(f"/jobs/{accepted['job_id']}/cancel").json()
    assert set(canceled["error"]) == {"code", "message"}
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(schema["JobView"]["properties"]["state"]["enum"]) == {
        "queued", "planning", "rendering", "succeeded", "failed", "canceled"}
    assert {"llm_unavailable", "llm_bad_output", "invalid_layout", "out_of_memory", "worker_lost", "canceled"} <= set(
        schema["JobError"]["properties"]["code"]["enum"])


def test_an_instruct_retried_while_its_turn_renders_gets_the_same_202(client):
    """The 409 'turn still rendering' check ran before the Idempotency-Key replay."""
    store = client.app.state.store
    first = client.post("/generate", json={"layout": LAYOUT, "width": 64, "height": 64}).json()
    assert store.claim(first["job_id"], "render", "test-worker:1", 3, 60) is not None  # what a render worker does
    assert store.finish(first["job_id"], "test-worker:1", "succeeded").state == "succeeded"
    url, key = f"/sessions/{first['session_id']}/instruct", {"Idempotency-Key": "instruct-once"}
    accepted = client.post(url, json={"instruction": "add a dog"}, headers=key)
    again = client.post(url, json={"instruction": "add a dog"}, headers=key)
    assert accepted.status_code == again.status_code == 202 and again.json() == accepted.json()
    assert len(client.get(f"/sessions/{first['session_id']}").json()["turns"]) == 2
    other = client.post(url, json={"instruction": "add a cat"}, headers=key)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    busy = client.post(url, json={"instruction": "add a cat"})
    assert busy.status_code == 409 and "still queued" in busy.json()["detail"]


def test_a_form_body_says_to_send_json_and_a_huge_body_is_413(client):
    """`curl -d '{...}'` without a content-type header sends a form: the 422 said only 'valid dictionary'."""
    form = client.post("/generate", content=b'{"prompt": "a cat"}',
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert _fields(form) == [""] and "Content-Type: application/json" in form.text
    huge = client.post("/generate", json={"prompt": "a cat", "negative_prompt": "x" * 400_000})
    assert huge.status_code == 413


@pytest.mark.parametrize("key", ["", "k" * 201])
def test_a_bad_idempotency_key_is_a_422_located_at_the_header(client, key):
    response = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64}, headers={"Idempotency-Key": key})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["header", "idempotency-key"] and "1..200 characters" in error["msg"]
    assert len(response.content) < 1000
