"""The Celery tasks (thin: they call ``worker.runtime``) and the worker's signal handlers."""

from __future__ import annotations

import logging
import threading

from celery import current_app, shared_task, signals
from celery.exceptions import TimeLimitExceeded

from jobs.queue import PLAN_TASK, RENDER_TASK, enqueue
from lmd import wiring
from worker import runtime

log = logging.getLogger(__name__)


@shared_task(name=PLAN_TASK)
def plan(job_id: str) -> str:
    """Stage 1 for one job (queue ``plan``)."""
    return runtime.current().run_plan(job_id)


@shared_task(name=RENDER_TASK)
def render(job_id: str) -> str:
    """Stage 2 for one job (queue ``render``)."""
    return runtime.current().run_render(job_id)


@signals.worker_process_init.connect
def _preload_pipeline(**_: object) -> None:
    """In each render pool child, after the fork (no CUDA in the parent): start loading the model at
    once, in a thread, so the child reports itself up within Celery's start-up timeout."""
    if current_app.conf.get("lmd_preload_pipeline"):
        threading.Thread(target=runtime.current().preload_pipeline, name="lmd-preload", daemon=True).start()


@signals.task_failure.connect
def _end_on_hard_time_limit(sender=None, exception=None, args=None, **_: object) -> None:
    """A hard time limit kills the pool child mid-task; its main process ends the job ``timeout``."""
    if isinstance(exception, TimeLimitExceeded) and args:
        runtime.current().store.fail(args[0], "timeout", "the job ran past LMD_TASK_TIME_LIMIT_S and its process "
                                     "was stopped; use fewer steps or a smaller size")


_maintenance: dict[str, runtime.Maintenance] = {}


@signals.worker_ready.connect
def _start_maintenance(sender, **_: object) -> None:
    """In the worker's main process, after the pool has forked: register, reap lost jobs, drop old images."""
    app = sender.app
    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)

    def requeue(job_id: str, stage: str) -> None:  # to the render queue of the job's model
        enqueue(app, job_id, stage, model=maintenance.model_of(job_id))

    maintenance = runtime.Maintenance(wiring.load_settings(cached=True), sender.hostname, queues, requeue=requeue)
    maintenance.start()
    _maintenance[sender.hostname] = maintenance


@signals.worker_shutdown.connect
def _stop_maintenance(**_: object) -> None:
    for maintenance in _maintenance.values():
        maintenance.stop()
    _maintenance.clear()
