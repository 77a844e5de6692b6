"""Quotas and guards under concurrent requests, against a real ``lmd serve`` (uvicorn, threads) and Redis.

No workers run: jobs stay queued. A turn is made "succeeded" through the store, as a render
worker would finish it.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from jobs.store import Store
from layout_planner import Layout
from tests.support.service import APIProcess, free_port, service_settings, settings_env

KEYS = ["key-a", "key-b", "key-c", "key-d", "key-e"]
SMALL = {"width": 64, "height": 64}
LAYOUT = Layout.model_validate({"objects": [{"id": "cat", "phrase": "a cat", "box": [0.1, 0.1, 0.5, 0.5]}]})


@pytest.fixture(scope="module")
def server(private_redis, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quotas")
    settings = service_settings(private_redis.url, tmp / "data", api_keys=KEYS, max_active_jobs=20,
                                max_active_jobs_per_key=8, rate_limit_per_min=10_000, max_streams_per_key=2)
    api = APIProcess(settings_env(settings), tmp / "api.log").wait_ready()
    try:
        yield api, settings
    finally:
        api.stop()


def _post(api, key, path, body, headers=None):
    with httpx.Client(base_url=api.base_url, timeout=30) as c:
        return c.post(path, json=body, headers={"X-API-Key": key, **(headers or {})})


def _clear(settings):
    """Cancel every queued job (frees the caps for the next test)."""
    store = Store.from_settings(settings)
    for job_id in list(store.redis.smembers(store.active_key)):
        store.request_cancel(job_id)


def test_a_burst_of_posts_admits_exactly_the_caps(server):
    api, settings = server
    _clear(settings)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: (KEYS[i % 5], _post(api, KEYS[i % 5], "/generate",
                                                              {"prompt": "a cat", **SMALL})), range(100)))
    accepted = Counter(key for key, r in answers if r.status_code == 202)
    refused = [r for _, r in answers if r.status_code != 202]
    assert sum(accepted.values()) == 20, accepted  # LMD_MAX_ACTIVE_JOBS, not 22 or 28
    assert max(accepted.values()) <= 8  # LMD_MAX_ACTIVE_JOBS_PER_KEY
    assert {r.status_code for r in refused} == {429}
    assert {r.json()["code"] for r in refused} == {"too_many_active_jobs"}
    assert all(int(r.headers["retry-after"]) > 0 for r in refused)
    _clear(settings)


def test_one_key_cannot_take_the_whole_queue(server):
    api, settings = server
    _clear(settings)
    codes = [_post(api, "key-a", "/generate", {"prompt": "a cat", **SMALL}).status_code for _ in range(10)]
    assert codes == [202] * 8 + [429] * 2
    assert _post(api, "key-b", "/generate", {"prompt": "a cat", **SMALL}).status_code == 202
    _clear(settings)


def test_concurrent_instructs_on_a_finished_session_start_one_turn(server):
    api, settings = server
    _clear(settings)
    accepted = _post(api, "key-c", "/generate", {"prompt": "a cat", **SMALL}).json()
    store = Store.from_settings(settings)
    store.update_job(accepted["job_id"], lambda j: j.model_copy(update={"state": "succeeded", "layout": LAYOUT}))
    path = f"/sessions/{accepted['session_id']}/instruct"
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _post(api, "key-c", path, {"instruction": f"add a dog number {i}"}), range(12)))
    assert sorted(r.status_code for r in answers) == [202] + [409] * 11
    assert {r.json()["code"] for r in answers if r.status_code == 409} == {"not_finished"}
    assert len(store.get_session(accepted["session_id"]).turns) == 2
    _clear(settings)


def test_event_streams_are_limited_per_key(server):
    api, settings = server
    _clear(settings)
    job_ids = [_post(api, "key-d", "/generate", {"prompt": "a cat", **SMALL}).json()["job_id"] for _ in range(3)]
    with httpx.Client(base_url=api.base_url, timeout=30, headers={"X-API-Key": "key-d"}) as c:
        with c.stream("GET", f"/jobs/{job_ids[0]}/events") as first, c.stream("GET", f"/jobs/{job_ids[1]}/events") as second:
            assert (first.status_code, second.status_code) == (200, 200)
            third = c.get(f"/jobs/{job_ids[2]}/events")
            assert third.status_code == 429 and third.json()["code"] == "too_many_streams"
            other_key = httpx.get(f"{api.base_url}/jobs/{job_ids[2]}/events", headers={"X-API-Key": "key-e"})
            assert other_key.status_code == 404  # not its job: streams are counted per key, after the lookup
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server notices the closed streams within a poll or two
            with c.stream("GET", f"/jobs/{job_ids[2]}/events") as again:
                if again.status_code == 200:
                    break
            time.sleep(0.2)
        assert again.status_code == 200
    _clear(settings)


# --- in-process app: turns, pagination, rate, retention, a full store, persistence ----------------------------

@pytest.fixture()
def app_with(private_redis, tmp_path):
    def make(**overrides):
        return TestClient(create_app(service_settings(private_redis.url, tmp_path, **overrides)))
    return make


def test_a_session_holds_at_most_max_turns_and_pages_its_turns(app_with):
    with app_with(max_turns=5) as c:
        first = c.post("/generate", json={"prompt": "a cat", **SMALL}).json()
        for _ in range(4):
            assert c.post("/generate", json={"prompt": "a cat", "session_id": first["session_id"], **SMALL}).status_code == 202
        refused = c.post("/generate", json={"prompt": "a cat", "session_id": first["session_id"], **SMALL})
        assert refused.status_code == 409 and refused.json()["code"] == "too_many_turns"
        page = c.get(f"/sessions/{first['session_id']}", params={"limit": 2}).json()
        assert ([t["turn"] for t in page["turns"]], page["total_turns"], page["next_offset"]) == ([1, 2], 5, 2)
        last = c.get(f"/sessions/{first['session_id']}", params={"offset": 4, "limit": 2}).json()
        assert ([t["turn"] for t in last["turns"]], last["next_offset"]) == ([5], None)
        assert c.get(f"/sessions/{first['session_id']}", params={"limit": 101}).status_code == 422


def test_the_request_rate_per_key_is_limited(app_with):
    with app_with(rate_limit_per_min=3, api_keys=["k1", "k2"]) as c:
        codes = [c.post("/generate", json={"prompt": "a cat", **SMALL}, headers={"X-API-Key": "k1"}).status_code
                 for _ in range(4)]
        assert codes == [202, 202, 202, 429]
        limited = c.post("/generate", json={"prompt": "a cat", **SMALL}, headers={"X-API-Key": "k1"})
        assert limited.json()["code"] == "rate_limited" and 1 <= int(limited.headers["retry-after"]) <= 61
        assert c.post("/generate", json={"prompt": "a cat", **SMALL}, headers={"X-API-Key": "k2"}).status_code == 202


def test_canceled_jobs_are_kept_shorter_than_others(app_with, private_redis):
    with app_with(retention_s=7200, failed_retention_s=600) as c:
        kept = c.post("/generate", json={"prompt": "a cat", **SMALL}).json()["job_id"]
        dropped = c.post("/generate", json={"prompt": "a cat", **SMALL}).json()["job_id"]
        c.post(f"/jobs/{dropped}/cancel")
    raw = redis.Redis(port=private_redis.port)
    assert 600 < raw.ttl(f"lmd:job:{kept}") <= 7200
    assert 0 < raw.ttl(f"lmd:job:{dropped}") <= 600


def test_a_full_store_is_a_clear_507(app_with, private_redis):
    raw = redis.Redis(port=private_redis.port)
    with app_with() as c:
        used = int(raw.info("memory")["used_memory"])
        raw.config_set("maxmemory", used + 1024)
        try:
            big = "a large cat " * 150
            answers = [c.post("/generate", json={"prompt": big, **SMALL}) for _ in range(60)]
        finally:
            raw.config_set("maxmemory", 0)
        full = [r for r in answers if r.status_code != 202]
        assert full and {r.status_code for r in full} == {507}
        assert full[0].json()["code"] == "store_full" and "retry-after" in full[0].headers


def test_readiness_reports_persistence_and_the_app_warns_without_it(app_with, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="api.main"), app_with() as c:
        assert c.get("/readyz").json()["persistence"] == "none"  # the test server runs --appendonly no
    assert any("without persistence" in r.getMessage() for r in caplog.records)

    port = free_port()
    aof = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
                            "--dir", str(tmp_path), "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        caplog.clear()
        settings = service_settings(f"redis://127.0.0.1:{port}/0", tmp_path)
        with caplog.at_level(logging.WARNING, logger="api.main"), TestClient(create_app(settings)) as c:
            assert c.get("/readyz").json()["persistence"] == "aof"
        assert not any("persistence" in r.getMessage() for r in caplog.records)
    finally:
        aof.terminate()
        aof.wait(timeout=10)


def test_a_publish_that_fails_while_redis_refuses_for_memory_is_read_as_a_full_store():
    """kombu can fail its publish retry with an AttributeError raised while handling Redis's
    maxmemory refusal: the refusal is found on the chain, a bare AttributeError is not one."""
    from api.submit import _refused_for_memory

    try:
        try:
            raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
        except redis.exceptions.OutOfMemoryError:
            raise AttributeError("'NoneType' object has no attribute 'client'")
    except AttributeError as during:
        assert _refused_for_memory(during)
    assert not _refused_for_memory(AttributeError("'NoneType' object has no attribute 'client'"))
