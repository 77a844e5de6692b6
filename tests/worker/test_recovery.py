"""Claims, heartbeats and the reaper on a real Redis: how a job survives (or reports) a dead worker.

The worker processes themselves are exercised in test_service_*.py; here the same store and
maintenance code run in-process so each rule is checked on its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from jobs.queue import create_celery, enqueue, redelivery_after_s
from jobs.records import new_id
from jobs.store import Store, connect, process_host
from worker.runtime import Heartbeat, Maintenance
from tests.support.builders import job_record, layout_data, session_record
from tests.support.service import service_settings

LAYOUT = layout_data()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def settings(private_redis, tmp_path_factory):
    return service_settings(private_redis.url, tmp_path_factory.mktemp("data"), max_redeliveries=1,
                            worker_lost_after_s=2.0, heartbeat_s=0.2)


@pytest.fixture(scope="module")
def store(settings):
    return Store(connect(settings.redis_url, settings.redis_timeout_s), settings.retention_s)


@pytest.fixture
def maintenance(settings):
    app = create_celery(settings)
    return Maintenance(settings, "test-maintenance", ["plan"], requeue=lambda job_id, stage: enqueue(app, job_id, stage))


def _new_job(store: Store, layout: dict | None = LAYOUT) -> str:
    session = session_record()
    job = job_record(job_id=new_id(), session_id=session.session_id, layout=layout, layout_given=layout is not None)
    store.create_job(job, session)
    return job.job_id


def _age_heartbeat(store: Store, job_id: str, seconds: float) -> None:
    store.update_job(job_id, lambda j: j.model_copy(update={"heartbeat_at": time.time() - seconds}))


def test_a_live_worker_keeps_its_job_and_a_duplicate_delivery_is_skipped(store, settings):
    job_id = _new_job(store)
    first = store.claim(job_id, "render", "host-a:1", 2, settings.worker_lost_after_s)
    assert first is not None and first.state == "rendering" and first.deliveries == 1
    assert store.claim(job_id, "render", "host-b:2", 2, settings.worker_lost_after_s) is None
    assert store.claim(job_id, "plan", "host-b:2", 2, settings.worker_lost_after_s) is None  # wrong stage


def test_the_reaper_requeues_a_job_whose_heartbeat_stopped(store, settings, maintenance, private_redis):
    job_id = _new_job(store)
    store.claim(job_id, "render", "host-a:1", 2, settings.worker_lost_after_s)
    assert maintenance.sweep() == []  # still fresh
    _age_heartbeat(store, job_id, 10)
    queued = redis.Redis(port=private_redis.port).llen("render")
    lost = maintenance.sweep()  # (an earlier test's job may have gone stale too on a slow machine)
    assert (job_id, "render") in lost
    assert redis.Redis(port=private_redis.port).llen("render") == queued + len(lost)
    released = store.get_job(job_id)
    assert released.state == "rendering" and released.worker is None and released.progress.stage == "requeued"
    again = store.claim(job_id, "render", "host-b:2", 2, settings.worker_lost_after_s)
    assert again is not None and again.deliveries == 2


def test_a_job_that_keeps_losing_its_worker_ends_worker_lost(store, settings, maintenance):
    job_id = _new_job(store)
    for worker in ("host-a:1", "host-b:2"):  # max_redeliveries=1: two deliveries in all
        assert store.claim(job_id, "render", worker, 2, settings.worker_lost_after_s) is not None
        _age_heartbeat(store, job_id, 10)
        maintenance.sweep()
    job = store.get_job(job_id)
    assert job.state == "failed" and job.error.code == "worker_lost"
    assert "died 2 time(s)" in job.error.message
    assert store.claim(job_id, "render", "host-c:3", 2, settings.worker_lost_after_s) is None
    assert job_id not in store.redis.smembers(store.active_key)


def test_a_lost_job_whose_cancel_was_requested_ends_canceled_and_frees_the_caps(store, settings, maintenance, private_redis):
    job_id = _new_job(store)
    store.claim(job_id, "render", "host-a:1", 2, settings.worker_lost_after_s)
    assert store.request_cancel(job_id).cancel_requested
    _age_heartbeat(store, job_id, 10)
    queued = redis.Redis(port=private_redis.port).llen("render")
    assert (job_id, "render") not in maintenance.sweep()
    assert redis.Redis(port=private_redis.port).llen("render") == queued  # not sent again
    job = store.get_job(job_id)
    assert (job.state, job.error.code) == ("canceled", "canceled")
    assert job_id not in store.redis.smembers(store.active_key)
    assert job_id not in store.redis.smembers(store.owner_active_key(job.owner))


def test_a_redelivery_over_the_bound_fails_at_claim(store, settings):
    job_id = _new_job(store)
    store.claim(job_id, "render", "host-a:1", 1, settings.worker_lost_after_s)
    _age_heartbeat(store, job_id, 10)
    assert store.claim(job_id, "render", "host-b:2", 1, settings.worker_lost_after_s) is None
    assert store.get_job(job_id).error.code == "worker_lost"


def test_a_dead_process_on_this_host_is_stale_at_once(store, settings):
    """A killed pool child: the next child on the same host takes the job without waiting for the heartbeat."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    job_id = _new_job(store)
    store.claim(job_id, "render", f"{process_host()}:{child.pid}", 3, settings.worker_lost_after_s)
    taken = store.claim(job_id, "render", "host-b:2", 3, settings.worker_lost_after_s)
    assert taken is not None and taken.deliveries == 2


def test_a_worker_in_another_pid_namespace_on_the_same_hostname_is_not_judged_by_pid(store, settings):
    """Containers on the host's network (compose-check's) share a hostname, not a process table."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux's unshare is not installed")
    code = "from jobs.store import this_worker; print(this_worker())"
    other = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if other.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {other.stderr.strip()[-200:]}")
    identity = other.stdout.strip()
    host, _, pid = identity.rpartition(":")
    assert host.startswith(socket.gethostname()) and host != process_host()
    job_id = _new_job(store)
    store.claim(job_id, "render", identity, 3, settings.worker_lost_after_s)
    assert store.claim(job_id, "render", "host-b:2", 3, settings.worker_lost_after_s) is None  # heartbeat still fresh


def test_heartbeat_refreshes_and_notices_a_lost_job(store, settings):
    job_id = _new_job(store)
    store.claim(job_id, "render", "host-a:1", 3, settings.worker_lost_after_s)
    _age_heartbeat(store, job_id, 1)
    old = store.get_job(job_id).heartbeat_at
    with Heartbeat(store, job_id, "host-a:1", interval_s=0.05) as beat:
        deadline = time.monotonic() + 10
        while store.get_job(job_id).heartbeat_at == old and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.get_job(job_id).heartbeat_at > old and not beat.lost
        store.update_job(job_id, lambda j: j.model_copy(update={"worker": "host-b:2"}))  # reaped and retaken
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert beat.lost
    assert store.get_job(job_id).worker == "host-b:2"  # the old owner wrote nothing more


def test_cancel_of_a_running_job_raises_the_flag_and_only_its_worker_ends_it(store, settings):
    job_id = _new_job(store)
    store.claim(job_id, "render", "host-a:1", 3, settings.worker_lost_after_s)
    job = store.request_cancel(job_id)
    assert job.state == "rendering" and job.cancel_requested and store.cancel_requested(job_id)
    assert store.finish(job_id, "host-b:2", "canceled", "canceled", "x").state == "rendering"
    ended = store.finish(job_id, "host-a:1", "canceled", "canceled", "canceled while rendering")
    assert ended.state == "canceled" and not store.cancel_requested(job_id)


def test_a_queued_job_canceled_before_it_starts_is_never_claimed(store, settings):
    job_id = _new_job(store, layout=None)
    assert store.request_cancel(job_id).state == "canceled"
    assert store.claim(job_id, "plan", "host-a:1", 3, settings.worker_lost_after_s) is None
    assert store.get_job(job_id).state == "canceled"


def test_maintenance_registers_the_worker(settings, store, maintenance):
    maintenance.start()
    try:
        deadline = time.monotonic() + 10
        while not store.workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [w["name"] for w in store.workers()] == ["test-maintenance"]
    finally:
        maintenance.stop()
    assert store.workers() == []  # a stopped worker leaves /readyz at once


def test_maintenance_touches_the_alive_file_only_while_redis_takes_its_registration(settings, tmp_path):
    """The container health check of a worker (docker-compose.yml) reads this file's age."""
    alive = tmp_path / "alive"
    app = create_celery(settings)
    live = Maintenance(settings.model_copy(update={"worker_alive_file": alive}), "alive-check", ["render"],
                       requeue=lambda job_id, stage: enqueue(app, job_id, stage))
    live.start()
    try:
        deadline = time.monotonic() + 10
        while not alive.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = alive.stat().st_mtime
        while alive.stat().st_mtime == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive.stat().st_mtime > first  # touched again on the next beat
    finally:
        live.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # nothing listens there
    dead_file = tmp_path / "dead"
    dead = Maintenance(settings.model_copy(update={"worker_alive_file": dead_file, "redis_url": dead_url}),
                       "dead-check", ["render"], requeue=lambda job_id, stage: None)
    dead.start()
    try:
        time.sleep(10 * settings.heartbeat_s)
        assert not dead_file.exists()
    finally:
        dead.stop()


def test_celery_reliability_settings(settings):
    """docs/service.md "Reliability": what the lost-worker design relies on from Celery 5.7."""
    conf = create_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_acks_on_failure_or_timeout
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert conf.task_soft_time_limit < conf.task_time_limit < conf.broker_transport_options["visibility_timeout"]
    assert conf.task_publish_retry_policy["max_retries"] <= 3


def _age_record(store: Store, job_id: str, seconds: float) -> None:
    """Make the stored job look untouched for ``seconds`` (as after a long wait)."""
    key = store.job_key(job_id)
    job = store.get_job(job_id)
    old = job.updated_at.timestamp() - seconds
    aged = job.model_copy(update={"updated_at": datetime.fromtimestamp(old, UTC)})
    store.redis.set(key, aged.model_dump_json(), keepttl=True)


def test_a_job_whose_message_was_lost_is_sent_again_once_per_period(store, settings, maintenance, private_redis):
    """A job nobody holds and that has not moved for the broker's visibility timeout (a Redis
    restart without AOF, a publish that failed after planning) is re-sent, at most once per period."""
    raw = redis.Redis(port=private_redis.port)
    period = redelivery_after_s(settings)
    waiting = _new_job(store)  # queued with a layout: its render message was never sent
    planned = _new_job(store, layout=None)
    _age_record(store, waiting, period - 30)
    assert waiting not in [j for j, _ in maintenance.sweep()]  # a long queue is not a lost message
    _age_record(store, waiting, 60)
    _age_record(store, planned, period + 5)
    before = raw.llen("render"), raw.llen("plan")
    requeued = maintenance.sweep()
    assert (waiting, "render") in requeued and (planned, "plan") in requeued
    assert (raw.llen("render"), raw.llen("plan")) == (before[0] + 1, before[1] + 1)
    assert store.get_job(waiting).progress.stage == "requeued"
    assert not {waiting, planned} & {j for j, _ in maintenance.sweep()}  # the period restarted
    claimed = store.claim(waiting, "render", "host-a:1", 2, settings.worker_lost_after_s)
    assert claimed is not None and claimed.deliveries == 1
    assert store.claim(waiting, "render", "host-b:2", 2, settings.worker_lost_after_s) is None  # the duplicate
    for job_id in (waiting, planned):
        store.request_cancel(job_id)
