"""The per-key request rate (``Store.hit_rate``) on a real Redis: a moving window, so no double
burst at a clock minute's edge (issue 19: a fixed window let 20 through in 5.5 s at a limit of 10)."""

from __future__ import annotations

import time

import pytest

from jobs.store import Store, connect


@pytest.fixture
def store(private_redis):
    client = connect(private_redis.url, 2.0)
    client.flushdb()
    return Store(client, 3600)


def test_no_double_burst_at_a_minute_edge(store, monkeypatch):
    edge = (time.time() // 60 + 1) * 60  # the next clock minute
    clock = [edge - 0.5]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    before = [store.hit_rate("key-a", 10) for _ in range(10)]
    clock[0] = edge + 0.5
    after = [store.hit_rate("key-a", 10) for _ in range(10)]
    assert before == [None] * 10
    assert all(wait is not None for wait in after), after  # a fixed window let all of these through
    assert 58 <= after[0] <= 60  # the oldest hit leaves the window at edge + 59.5
    clock[0] = edge + 59.6  # the first ten left the window
    assert [store.hit_rate("key-a", 10) for _ in range(11)][9:] == [None, 60]


def test_keys_are_counted_apart_and_refusals_are_not_counted(store, monkeypatch):
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    assert [store.hit_rate("key-a", 3) for _ in range(5)][3:] != [None, None]
    assert store.hit_rate("key-b", 3) is None and store.hit_rate(None, 3) is None
    clock[0] += 60.5
    assert [store.hit_rate("key-a", 3) for _ in range(3)] == [None] * 3  # the 2 refused left nothing behind
