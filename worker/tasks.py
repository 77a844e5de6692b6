"""The Celery tasks (thin: they call ``worker.runtime``) and the worker's signal handlers."""

from __future__ import annotations

import logging

from celery import shared_task, signals

from lmd.settings import get_settings
from worker import runtime
from worker.celery_app import PLAN_TASK, RENDER_TASK, enqueue

log = logging.getLogger(__name__)


@shared_task(name=PLAN_TASK)
def plan(job_id: str) -> str:
    """Stage 1 for one job (queue ``plan``)."""
    return runtime.current().run_plan(job_id)


@shared_task(name=RENDER_TASK)
def render(job_id: str) -> str:
    """Stage 2 for one job (queue ``render``)."""
    return runtime.current().run_render(job_id)


_maintenance: dict[str, runtime.Maintenance] = {}


@signals.worker_ready.connect
def _start_maintenance(sender, **_: object) -> None:
    """In the worker's main process, after the pool has forked: register, reap lost jobs, drop old images."""
    app = sender.app
    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)
    maintenance = runtime.Maintenance(
        get_settings(), sender.hostname, queues, requeue=lambda job_id, stage: enqueue(app, job_id, stage)
    )
    maintenance.start()
    _maintenance[sender.hostname] = maintenance


@signals.worker_shutdown.connect
def _stop_maintenance(**_: object) -> None:
    for maintenance in _maintenance.values():
        maintenance.stop()
    _maintenance.clear()
