"""Issue 19's findings that need no worker: ids, echoes, 413s, plan-only files, the schema per
deployment, security headers and key schemes (the API in-process, a private Redis)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import MAX_BODY_BYTES, create_app
from jobs.store import Store
from tests.support.builders import box_object, layout_data
from tests.support.service import service_settings

SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def client(private_redis, tmp_path_factory):
    with TestClient(create_app(service_settings(private_redis.url, tmp_path_factory.mktemp("data")))) as c:
        yield c


# --- defect 1: ids made only of dots ------------------------------------------------------------------
@pytest.mark.parametrize("object_id", [".", "..", "...", ".x", "-x"])
def test_an_id_that_is_not_a_plain_file_name_is_a_422_at_submission(client, object_id):
    response = client.post("/generate", json={"layout": layout_data(box_object(object_id)), **SMALL})
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "layout", "objects", 0, "id"]]
    assert "the first a letter, digit or '_'" in response.text


def test_the_schema_states_the_same_id_alphabet(client):
    import re

    pattern = client.get("/openapi.json").json()["components"]["schemas"]["LayoutObject"]["properties"]["id"]["pattern"]
    assert not re.match(pattern, "...") and re.match(pattern, "cat_2.b-c")


# --- defect 3: bounded echoes ----------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("language", "x" * 200_000),  # the validator's message quoted the value whole (ctx.error)
    ("variant", "v" * 200_000),  # a literal's ctx and input
    ("steps", "9" * 200_000),  # an int parse of a huge string
    ("layout", {"objects": [box_object("i" * 200_000)]}),  # the id's message
])
def test_a_422_echoes_no_more_than_a_few_hundred_characters_whatever_the_field(client, field, value):
    response = client.post("/generate", json={"prompt": "a cat", **SMALL, field: value})
    assert response.status_code == 422, response.text[:500]
    assert len(response.content) < 3000, (field, len(response.content))


# --- defect 4: one 413 --------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_the_same_json_413_with_or_without_content_length(client):
    body = b'{"prompt": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    declared = client.post("/generate", content=body, headers={"content-type": "application/json"})

    def chunks():
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    chunked = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in chunked.request.headers  # really sent chunked
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/json"
        assert response.json()["code"] == "too_large" and "256 KiB" in response.json()["detail"]
    assert client.post("/generate", json={"prompt": "a cat", **SMALL}).status_code == 202  # the next request is fine


# --- defect 5: a plan-only job has no image -------------------------------------------------------------
def test_a_plan_only_jobs_image_and_overlay_are_409_not_gone(client):
    job_id = client.post("/plan", json={"prompt": "a cat", **SMALL}).json()["job_id"]
    store: Store = client.app.state.store
    store.claim(job_id, "plan", "host-a:1", 3, 60.0)
    from layout_planner import Layout

    assert store.hand_to_render(job_id, "host-a:1", Layout.model_validate(layout_data())).state == "succeeded"
    for path in ("image", "overlay", "report", "masks/cat"):
        response = client.get(f"/jobs/{job_id}/{path}")
        assert response.status_code == 409, (path, response.text)
        assert response.json()["code"] == "conflict" and "plan-only" in response.json()["detail"]


# --- defect 8: refine as deployed ----------------------------------------------------------------------
def _refine(doc: dict, schema: str = "GenerateRequest") -> dict:
    return doc["components"]["schemas"][schema]["properties"]["refine"]


def test_without_a_refiner_the_schema_allows_refine_false_or_null_only(client):
    doc = client.get("/openapi.json").json()
    for schema in ("GenerateRequest", "PlanRequest"):
        branches = _refine(doc, schema)["anyOf"]
        assert {"type": "boolean", "enum": [False]} in branches and {"type": "null"} in branches
    assert "refine" in doc["paths"]["/generate"]["post"]["responses"]["422"]["description"]
    refused = client.post("/generate", json={"prompt": "a cat", "refine": True, **SMALL})
    assert refused.status_code == 422 and "LMD_REFINER" in refused.text


def test_with_a_refiner_the_schema_allows_refine_true(private_redis, tmp_path):
    settings = service_settings(private_redis.url, tmp_path, refiner="stabilityai/stable-diffusion-xl-refiner-1.0")
    with TestClient(create_app(settings)) as c:
        assert {"type": "boolean"} in _refine(c.get("/openapi.json").json())["anyOf"]


# --- security headers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/static/studio/main.js", "/static/studio/png.js", "/static/studio.css"])
def test_the_studios_files_carry_a_strict_policy(client, path):
    response = client.get(path)
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'" and "unsafe-inline" not in csp
    assert directives["connect-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_api_answers_are_not_sniffed_and_docs_keep_their_own_scripts(client):
    for response in (client.get("/healthz"), client.get("/jobs/" + "0" * 32),
                     client.post("/generate", content=b"x" * (MAX_BODY_BYTES + 1))):
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in client.get("/docs").headers  # Swagger UI loads its CDN scripts


# --- the key headers in the schema ---------------------------------------------------------------------
def test_with_keys_on_the_schema_says_how_to_send_one_and_x_api_key_wins(private_redis, tmp_path):
    settings = service_settings(private_redis.url, tmp_path, api_keys=["good-key"])
    with TestClient(create_app(settings)) as c:
        doc = c.get("/openapi.json").json()
        schemes = doc["components"]["securitySchemes"]
        assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
        assert schemes["Bearer"]["scheme"] == "bearer" and "Authorization is ignored" in schemes["ApiKey"]["description"]
        assert doc["paths"]["/generate"]["post"]["security"] == [{"ApiKey": []}, {"Bearer": []}]
        assert {} in doc["paths"]["/readyz"]["get"]["security"]
        assert "security" not in doc["paths"]["/healthz"]["get"]
        both = {"X-API-Key": "good-key", "Authorization": "Bearer wrong"}
        assert c.get("/jobs/" + "0" * 32, headers=both).status_code == 404  # X-API-Key read: authenticated
        swapped = {"X-API-Key": "wrong", "Authorization": "Bearer good-key"}
        assert c.get("/jobs/" + "0" * 32, headers=swapped).status_code == 401


def test_with_keys_off_no_operation_asks_for_one(client):
    doc = client.get("/openapi.json").json()
    assert all("security" not in op for methods in doc["paths"].values() for op in methods.values())
