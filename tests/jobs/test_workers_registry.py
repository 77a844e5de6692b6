"""Who is alive (``Store.workers``) on a real Redis: read from a set of names, never by scanning
the keyspace (issue 19's load benchmark: each event stream asks each second, and a SCAN's cost
grew with every job stored)."""

from __future__ import annotations

import time

import pytest

from jobs.store import Store, connect


@pytest.fixture
def store(private_redis):
    client = connect(private_redis.url, 2.0)
    client.flushdb()
    return Store(client, 3600)


def test_workers_are_read_without_a_scan_and_expired_ones_leave(store, monkeypatch):
    store.register_worker("render-b", ["render"], ttl_s=60)
    store.register_worker("plan-a", ["plan"], ttl_s=1)
    for i in range(50):  # jobs' keys beside them do not matter
        store.redis.set(f"{store.prefix}:job:{i}", "{}")
    monkeypatch.setattr(store.redis, "scan_iter", lambda *a, **k: pytest.fail("workers() scanned the keyspace"))
    assert [w["name"] for w in store.workers()] == ["plan-a", "render-b"]
    time.sleep(1.2)  # plan-a's heartbeat key expires
    assert [w["name"] for w in store.workers()] == ["render-b"]
    assert store.redis.smembers(store.workers_key) == {"render-b"}
    store.unregister_worker("render-b")
    assert store.workers() == [] and not store.redis.exists(store.workers_key)
