"""/readyz says which layout planner the settings select and why."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app
from tests.support.service import service_settings


def test_readyz_names_the_planner_and_why(private_redis, tmp_path):
    local = service_settings(private_redis.url, tmp_path, local_llm_model="/models/planner")
    with TestClient(create_app(local)) as client:
        assert client.get("/readyz").json()["planner"] == {
            "kind": "local", "model": "/models/planner", "endpoint": None,
            "reason": "LMD_PLANNER=auto and no LLM endpoint or key is configured",
        }
    remote = service_settings(private_redis.url, tmp_path, llm_base_url="http://llm:8000/v1", llm_model="m")
    with TestClient(create_app(remote)) as client:
        assert client.get("/readyz").json()["planner"] == {
            "kind": "remote", "model": "m", "endpoint": "http://llm:8000/v1",
            "reason": "LMD_PLANNER=auto and LMD_LLM_BASE_URL is set",
        }
