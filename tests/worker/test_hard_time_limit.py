"""The hard time limit (``LMD_TASK_TIME_LIMIT_S``) on a real render worker (Celery prefork, the tiny model).

A render that stops answering signals (SIGSTOP on its pool process stands in for a hang in native
code, where the soft limit's exception can never be raised) runs past the hard limit: Celery's
main process kills that process and starts a new one, and the job ends ``failed`` with
``timeout`` and a message naming the setting. The next job runs on the new process.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from jobs.queue import create_celery, enqueue
from jobs.records import new_id
from jobs.store import Store
from tests.support.builders import job_record, layout, session_record
from tests.support.service import WorkerProcess, service_settings, settings_env
from tests.support.tiny_sd import tiny_sd_path  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow
SOFT_S, HARD_S = 8, 9


def _render_job(store: Store, steps: int) -> str:
    session = session_record()
    job = job_record(job_id=new_id(), session_id=session.session_id, layout=layout(), layout_given=True,
                     steps=steps, width=64, height=64, preset="fast")
    store.create_job(job, session)
    return job.job_id


def _wait(store: Store, job_id: str, done, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = store.get_job(job_id)
        if job is not None and done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: {store.get_job(job_id)}")


def test_a_render_past_the_hard_limit_is_killed_replaced_and_ends_failed(private_redis, tiny_sd_path, tmp_path):  # noqa: F811
    settings = service_settings(private_redis.url, tmp_path / "data", sd_model=str(tiny_sd_path), device="cpu",
                                dtype="float32", torch_threads=1, task_soft_time_limit_s=SOFT_S,
                                task_time_limit_s=HARD_S, heartbeat_s=0.5, reaper_interval_s=0.5)
    store = Store.from_settings(settings)
    app = create_celery(settings)
    worker = WorkerProcess("render", settings_env(settings), tmp_path / "render.log")
    try:
        worker.wait_ready(redis.Redis(port=private_redis.port))
        job_id = _render_job(store, steps=400)
        enqueue(app, job_id, "render")
        running = _wait(store, job_id, lambda j: j.state == "rendering" and j.worker is not None)
        child = int(running.worker.rpartition(":")[2])
        os.kill(child, signal.SIGSTOP)  # a hang no signal handler can interrupt
        ended = _wait(store, job_id, lambda j: j.terminal, timeout_s=HARD_S + 60)
        assert (ended.state, ended.error.code) == ("failed", "timeout"), (ended, worker.log())
        assert "LMD_TASK_TIME_LIMIT_S" in ended.error.message and "/" not in ended.error.message
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), "the stopped render process is still there"
        assert job_id not in store.redis.smembers(store.active_key)
        assert "Hard time limit" in worker.log()

        # The new process loads the model first (not part of the next job's time). The stopped one may have
        # been stopped mid-load, before its own "loaded in" line, so wait for a load by another pid.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _loaded_by_another(worker.log_path.read_text(errors="replace"), child):
            time.sleep(0.2)
        again = _render_job(store, steps=2)  # served by the pool's new process
        enqueue(app, again, "render")
        finished = _wait(store, again, lambda j: j.terminal)
        assert finished.state == "succeeded", (finished, worker.log())
        assert int(store.get_job(again).deliveries) == 1
    finally:
        worker.stop()


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _loaded_by_another(log: str, pid: int) -> bool:
    """A "pipeline loaded in ... (pid N)" line of a process other than ``pid``."""
    return any("loaded in" in line and f"(pid {pid})" not in line for line in log.splitlines())
