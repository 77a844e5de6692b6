"""The real plan worker (``lmd worker --queues plan``, a subprocess) with the local planner on a tiny random chat LM."""

from __future__ import annotations

import re
import time

import pytest
import redis

from jobs.queue import create_celery, enqueue
from jobs.records import JobRecord, SessionRecord, new_id, utcnow
from jobs.store import Store, connect
from layout_planner import Layout
from tests.support.service import WorkerProcess, service_settings, settings_env


@pytest.fixture(scope="module")
def service(private_redis, tmp_path_factory, tiny_lm_path):
    tmp = tmp_path_factory.mktemp("plan_local")
    settings = service_settings(private_redis.url, tmp / "data", planner="local", local_llm_model=str(tiny_lm_path),
                                local_llm_device="cpu", heartbeat_s=0.5)
    worker = WorkerProcess("plan", settings_env(settings), tmp / "plan.log")
    try:
        worker.wait_ready(redis.Redis.from_url(private_redis.url))
        store = Store(connect(settings.redis_url, settings.redis_timeout_s), settings.retention_s)
        yield store, create_celery(settings), worker
    finally:
        worker.stop()


def _submit(store: Store, app, prompt: str) -> str:
    now = utcnow()
    session = SessionRecord(session_id=new_id(), seed=1, created_at=now, updated_at=now)
    job = JobRecord(job_id=new_id(), session_id=session.session_id, prompt=prompt, seed=1, created_at=now, updated_at=now)
    store.create_job(job, session)
    enqueue(app, job.job_id, "plan")
    return job.job_id


def _wait(store: Store, job_id: str, states: set[str], worker: WorkerProcess, timeout_s: float = 120) -> JobRecord:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = store.get_job(job_id)
        if job.state in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stayed {job.state}; worker log:\n{worker.log()}")


def test_cancelling_a_plan_job_stops_its_generation_within_a_token(service):
    store, app, worker = service
    job_id = _submit(store, app, "three cats on a sofa, a red lamp on the left")
    _wait(store, job_id, {"planning"}, worker)  # claimed; the worker now loads the model (its first job)
    store.request_cancel(job_id)
    job = _wait(store, job_id, {"canceled", "failed", "rendering"}, worker)
    assert job.state == "canceled" and job.error.code == "canceled", job
    tokens = int(re.fullmatch(r"canceled while planning, after (\d+) generated tokens", job.error.message).group(1))
    assert tokens <= 1


def test_a_plan_job_with_the_local_planner_succeeds(service):
    store, app, worker = service
    job_id = _submit(store, app, "a dog on the left of a cat")
    job = _wait(store, job_id, {"rendering", "failed", "canceled"}, worker)
    assert job.state == "rendering" and job.error is None, job  # handed to the render queue with its layout
    assert Layout.model_validate(job.layout.model_dump()) == job.layout
    assert "planner: local layout model" in worker.log() and "(LMD_PLANNER=local)" in worker.log()
