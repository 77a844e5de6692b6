"""Redis stopped: 503 with Retry-After (no hang, no traceback); Redis back: the same app works again."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from api.main import create_app
from tests.support.service import RedisServer, service_settings

BODY = {"prompt": "a cat on a mat", "width": 64, "height": 64}


def test_redis_outage_is_503_with_retry_after_and_the_api_recovers(tmp_path):
    server = RedisServer().start()
    try:
        settings = service_settings(server.url, tmp_path, redis_timeout_s=0.5, retry_after_s=3)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            before = client.post("/generate", json=BODY)
            assert before.status_code == 202
            job_id = before.json()["job_id"]

            server.stop()
            for method, path, body in [
                ("POST", "/generate", BODY),
                ("GET", f"/jobs/{job_id}", None),
                ("POST", f"/jobs/{job_id}/cancel", None),
                ("GET", "/readyz", None),
                ("GET", "/metrics", None),
            ]:
                response = client.request(method, path, json=body)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == "3"
                assert "Redis is unreachable" in response.json()["detail"]
            assert client.get("/healthz").status_code == 200  # the process itself is alive

            server.start()  # same port, empty data (no persistence in this test server)
            assert client.get("/readyz").status_code == 200
            after = client.post("/generate", json=BODY)
            assert after.status_code == 202
            assert client.get(after.json()["status_url"]).json()["state"] == "queued"
    finally:
        server.stop()


def test_an_event_stream_ends_with_unavailable_when_redis_goes_away(tmp_path):
    server = RedisServer().start()
    try:
        settings = service_settings(server.url, tmp_path, redis_timeout_s=0.5, retry_after_s=3)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            job_id = client.post("/generate", json=BODY).json()["job_id"]  # stays queued: no worker
            threading.Timer(0.5, server.stop).start()
            with client.stream("GET", f"/jobs/{job_id}/events") as stream:
                text = "".join(stream.iter_text())
        events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event:")]
        assert events[0] == "state" and events[-1] == "unavailable"
        assert "retry: 3000" in text and "reconnect later" in text
    finally:
        server.stop()
