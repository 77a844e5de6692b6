"""Two ``lmd serve`` processes on one Redis (what ``--workers 2`` or two hosts behind a balancer
make): the caps, the instruct guard, the stream limit and the rate hold across them; and slow
clients meet the header deadline and the body stall timeout. No workers: jobs stay queued.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from jobs.store import Store
from layout_planner import Layout
from tests.support.service import APIProcess, service_settings, settings_env

KEYS = ["key-a", "key-b", "key-c"]
SMALL = {"width": 64, "height": 64}
LAYOUT = Layout.model_validate({"objects": [{"id": "cat", "phrase": "a cat", "box": [0.1, 0.1, 0.5, 0.5]}]})


@pytest.fixture(scope="module")
def servers(private_redis, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    settings = service_settings(private_redis.url, tmp / "data", api_keys=KEYS, max_active_jobs=12,
                                max_active_jobs_per_key=5, rate_limit_per_min=10_000, max_streams_per_key=2,
                                api_header_timeout_s=4.0, api_body_timeout_s=4.0)  # loose: the machine is shared
    apis = [APIProcess(settings_env(settings), tmp / f"api{i}.log") for i in range(2)]
    try:
        for api in apis:
            api.wait_ready()
        yield apis, settings
    finally:
        for api in apis:
            api.stop()


def _post(api, key, path, body):
    with httpx.Client(base_url=api.base_url, timeout=30) as c:
        return c.post(path, json=body, headers={"X-API-Key": key})


def _clear(settings):
    store = Store.from_settings(settings)
    for job_id in list(store.redis.smembers(store.active_key)):
        store.request_cancel(job_id)
    store.redis.delete(*store.redis.keys("lmd:rate:*") or ["-"])


def test_the_caps_hold_across_two_servers(servers):
    apis, settings = servers
    _clear(settings)
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: (KEYS[i % 3], _post(apis[i % 2], KEYS[i % 3], "/generate",
                                                              {"prompt": "a cat", **SMALL})), range(60)))
    accepted = Counter(key for key, r in answers if r.status_code == 202)
    assert sum(accepted.values()) == 12 and max(accepted.values()) <= 5, accepted
    assert {r.json()["code"] for _, r in answers if r.status_code != 202} == {"too_many_active_jobs"}
    _clear(settings)


def test_concurrent_instructs_through_two_servers_start_one_turn(servers):
    apis, settings = servers
    _clear(settings)
    accepted = _post(apis[0], "key-c", "/generate", {"prompt": "a cat", **SMALL}).json()
    store = Store.from_settings(settings)
    store.update_job(accepted["job_id"], lambda j: j.model_copy(update={"state": "succeeded", "layout": LAYOUT}))
    path = f"/sessions/{accepted['session_id']}/instruct"
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _post(apis[i % 2], "key-c", path, {"instruction": f"add dog {i}"}), range(12)))
    assert sorted(r.status_code for r in answers) == [202] + [409] * 11
    assert len(store.get_session(accepted["session_id"]).turns) == 2
    _clear(settings)


def test_the_stream_limit_and_the_rate_hold_across_two_servers(servers):
    apis, settings = servers
    _clear(settings)
    job_ids = [_post(apis[0], "key-b", "/generate", {"prompt": "a cat", **SMALL}).json()["job_id"] for _ in range(3)]
    headers = {"X-API-Key": "key-b"}
    with httpx.Client(timeout=30, headers=headers) as c:
        with c.stream("GET", f"{apis[0].base_url}/jobs/{job_ids[0]}/events") as first, \
                c.stream("GET", f"{apis[1].base_url}/jobs/{job_ids[1]}/events") as second:
            assert (first.status_code, second.status_code) == (200, 200)
            for api in apis:
                third = c.get(f"{api.base_url}/jobs/{job_ids[2]}/events")
                assert third.status_code == 429 and third.json()["code"] == "too_many_streams"
    _clear(settings)
    store = Store.from_settings(settings)
    limit = 4
    answers = [store.hit_rate("key-a", limit) for _ in range(limit + 1)]  # the same window the servers use
    assert answers[:limit] == [None] * limit and answers[limit] is not None


# --- slow clients --------------------------------------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None when it kept the connection open that long."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_a_client_that_never_finishes_its_headers_is_disconnected(servers):
    api = servers[0][0]
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
        assert _closed_within(sock, 15) == b""  # closed (LMD_API_HEADER_TIMEOUT_S=4), nothing answered
    with socket.create_connection(("127.0.0.1", api.port)) as sock:  # a keep-alive connection: the next request too
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        first = b""
        while b'"ok"}' not in first:
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert _closed_within(sock, 15) == b""


def test_a_body_that_stalls_is_a_json_408(servers):
    api = servers[0][0]
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-API-Key: key-a\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # then nothing
        answer = _closed_within(sock, 15) or b""
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
