"""How long a session and an Idempotency-Key claim are kept: as long as their longest-kept job
(issue 19, defect 6), on a real Redis."""

from __future__ import annotations

import pytest

from jobs.records import IdempotencyRecord, new_id
from jobs.store import Store, connect
from tests.support.builders import job_record, session_record

RETENTION_S, ENDED_S = 7 * 24 * 3600, 24 * 3600


@pytest.fixture(scope="module")
def store(private_redis):
    return Store(connect(private_redis.url, 2.0), RETENTION_S, ended_retention_s=ENDED_S)


def _submit(store: Store, session, claim: str | None = None):
    job = job_record(job_id=new_id(), session_id=session.session_id, owner="owner-a")
    idempotency = (claim, IdempotencyRecord(body_hash="h", job_id=job.job_id, session_id=session.session_id, turn=0)) if claim else None
    created, _ = store.create_job(job, store.get_session(session.session_id) or session, idempotency)
    return created


def _end(store: Store, job_id: str, how: str) -> None:
    if how == "canceled":
        store.request_cancel(job_id)  # a queued job: canceled at once
    else:
        assert store.claim(job_id, "plan", "host-a:1", 3, 60.0) is not None
        store.finish(job_id, "host-a:1", how, *(("internal", "boom") if how == "failed" else ()))


@pytest.mark.parametrize("how", ["failed", "canceled"])
def test_a_session_whose_only_turn_failed_or_was_canceled_is_kept_as_long_as_that_job(store, how):
    session = session_record(owner="owner-a")
    claim = store.idempotency_key("owner-a", "generate", new_id())
    job = _submit(store, session, claim)
    assert store.redis.ttl(store.session_key(session.session_id)) > ENDED_S  # while it may still succeed
    _end(store, job.job_id, how)
    for key in (store.job_key(job.job_id), store.session_key(session.session_id), claim):
        assert 0 < store.redis.ttl(key) <= ENDED_S, key


def test_a_session_with_a_succeeded_turn_keeps_the_full_retention(store):
    session = session_record(owner="owner-a")
    first = _submit(store, session)
    _end(store, first.job_id, "succeeded")
    second = _submit(store, session)
    _end(store, second.job_id, "failed")
    assert store.redis.ttl(store.session_key(session.session_id)) > ENDED_S
    assert 0 < store.redis.ttl(store.job_key(second.job_id)) <= ENDED_S
