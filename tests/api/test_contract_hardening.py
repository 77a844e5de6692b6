"""Findings of the hostile-client review that need no worker: one text rule, CORS, no internals, the schema."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from jobs.store import Store
from layout_planner import InvalidPrompt
from layout_planner.text import validate_text
from tests.support.service import service_settings

SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def client(private_redis, tmp_path_factory):
    with TestClient(create_app(service_settings(private_redis.url, tmp_path_factory.mktemp("data")))) as c:
        yield c


def test_a_carriage_return_is_refused_at_the_api_not_by_the_planner_later(client):
    response = client.post("/generate", json={"prompt": "a cat\r\non a mat", **SMALL})
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "prompt"]]
    assert "U+000D" in response.text


@pytest.mark.parametrize("char", ["\r", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\x9f", "\t", "\n",
                                  "\u2028", "\u00a0", "é", "🐈"])
def test_the_api_accepts_a_prompt_exactly_when_the_planner_does(client, char):
    prompt = f"a cat{char}on a mat"
    try:
        validate_text(prompt, "prompt", 2000)
        planner_accepts = True
    except InvalidPrompt:
        planner_accepts = False
    response = client.post("/generate", json={"prompt": prompt, **SMALL})
    assert (response.status_code == 202) == planner_accepts, response.text


def test_cors_is_off_by_default(client):
    response = client.options("/generate", headers={"Origin": "https://app.example",
                                                    "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers
    got = client.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in got.headers


def test_cors_allows_the_listed_origins_only(private_redis, tmp_path):
    settings = service_settings(private_redis.url, tmp_path, cors_origins=["https://app.example"])
    with TestClient(create_app(settings)) as c:
        preflight = c.options("/generate", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "content-type,idempotency-key"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()
        simple = c.post("/generate", json={"prompt": "a cat", **SMALL}, headers={"Origin": "https://app.example"})
        assert simple.status_code == 202 and simple.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


def test_with_keys_on_readiness_hides_workers_and_metrics_need_a_key(private_redis, tmp_path):
    settings = service_settings(private_redis.url, tmp_path, api_keys=["tenant-key"])
    Store.from_settings(settings).register_worker("render-1@gpu-host-7", ["render"], ttl_s=60)
    with TestClient(create_app(settings)) as c:
        anonymous = c.get("/readyz").json()
        assert anonymous["workers"] is None and anonymous["worker_counts"]["render"] >= 1
        assert "gpu-host-7" not in c.get("/readyz").text
        keyed = c.get("/readyz", headers={"X-API-Key": "tenant-key"}).json()
        assert "render-1@gpu-host-7" in [w["name"] for w in keyed["workers"]]
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics").json()["code"] == "unauthorized"
        assert c.get("/metrics", headers={"Authorization": "Bearer tenant-key"}).status_code == 200


def test_an_operator_key_setting_keeps_tenants_out_of_metrics(private_redis, tmp_path):
    settings = service_settings(private_redis.url, tmp_path, api_keys=["tenant-key"], ops_keys=["ops-key"])
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics", headers={"X-API-Key": "tenant-key"}).status_code == 401
        assert c.get("/readyz", headers={"X-API-Key": "tenant-key"}).json()["workers"] is None
        assert c.get("/metrics", headers={"X-API-Key": "ops-key"}).status_code == 200
        assert c.get("/readyz", headers={"X-API-Key": "ops-key"}).json()["workers"] is not None


def test_errors_carry_a_code_and_a_plain_detail(client):
    missing = client.get("/jobs/" + "0" * 32)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_the_schema_states_the_limits_the_errors_and_the_links(client):
    settings = client.app.state.settings
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    gen = schemas["GenerateRequest"]
    props = gen["properties"]
    assert {"required": ["prompt"]}.items() <= gen["anyOf"][0].items()
    assert gen["anyOf"][1]["required"] == ["layout"]
    width = props["width"]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (settings.min_size, settings.max_size, 8)
    steps = props["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, settings.max_steps)
    assert props["seed"]["anyOf"][0]["maximum"] == settings.max_seed
    assert props["prompt"]["anyOf"][0]["maxLength"] == settings.max_prompt_chars
    assert schemas["LayoutRequest"]["properties"]["objects"]["maxItems"] == settings.max_objects
    assert schemas["Layout"]["properties"]["warnings"]["maxItems"] == 40
    post = doc["paths"]["/generate"]["post"]
    assert {"400", "401", "404", "409", "413", "422", "429", "503", "507"} <= set(post["responses"])
    assert post["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    links = post["responses"]["202"]["links"]
    assert {links[n]["operationId"] for n in ("GetJob", "GetImage", "JobEvents")} == {"get_job", "get_image", "job_events"}
    job_param = doc["paths"]["/jobs/{job_id}"]["get"]["parameters"][0]
    assert job_param["schema"]["pattern"] == "^[0-9a-f]{32}$"
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            if path not in ("/healthz", "/limits"):  # these read no store
                assert "503" in operation["responses"], (method, path)
