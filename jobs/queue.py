"""The queues, the task names, the Celery app and enqueueing (docs/service.md "Processes").

Two queues: ``plan`` (stage 1, LLM calls, CPU) and ``render`` (stage 2, one process per
GPU). With several models (``LMD_MODELS``) each has its own render queue, ``render.<name>``,
served by workers that loaded that model, so no worker swaps a model per job (docs/models.md).
A generate is the chain plan -> render (render alone when a layout is given). The API
builds the app only to send tasks by name; the worker package registers the tasks
(``worker.tasks``, named here as a string, so this module never imports it or torch).
"""

from __future__ import annotations

from celery import Celery, chain

from jobs.records import Stage
from lmd.settings import Settings

PLAN_QUEUE = "plan"
RENDER_QUEUE = "render"
QUEUES = (PLAN_QUEUE, RENDER_QUEUE)
PLAN_TASK = "lmd.plan"
RENDER_TASK = "lmd.render"
TASKS_MODULE = "worker.tasks"


def render_queue(model: str | None) -> str:
    """The render queue of a job for the ``LMD_MODELS`` name ``model`` (None: the one model, ``render``)."""
    return RENDER_QUEUE if model is None else f"{RENDER_QUEUE}.{model}"


def queue_names(settings: Settings) -> list[str]:
    """Every queue a worker of these settings may serve: plan, then render or one per model."""
    return [PLAN_QUEUE, *(render_queue(name) for name in settings.models or [None])]


def is_render_queue(queue: str) -> bool:
    return queue == RENDER_QUEUE or queue.startswith(RENDER_QUEUE + ".")


def redelivery_after_s(settings: Settings) -> int:
    """The broker's visibility timeout: above the hard time limit, so a message a live worker
    holds is never handed to a second one. The reaper re-sends a job nobody holds after as long."""
    return settings.task_time_limit_s + 300


def create_celery(settings: Settings) -> Celery:
    app = Celery("lmd", broker=settings.redis_url, include=[TASKS_MODULE])
    transport = {
        "visibility_timeout": redelivery_after_s(settings),
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    app.conf.update(
        task_routes={PLAN_TASK: {"queue": PLAN_QUEUE}, RENDER_TASK: {"queue": RENDER_QUEUE}},
        task_default_queue=PLAN_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # On a broker connection loss Celery 5.x by default lets acks-late tasks run on (their message
        # is restored to the queue). That is right here: a second delivery finds the job held by a
        # live worker and skips it (jobs.transitions.claim), so a Redis blip never kills a render.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_ignore_result=True,  # state lives in the job records (jobs.store), not in a result backend
        broker_transport_options=transport,
        broker_connection_timeout=settings.redis_timeout_s,
        broker_connection_retry_on_startup=True,
        # Publishing while Redis is down fails fast (the API answers 503) instead of hanging.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


def enqueue(app: Celery, job_id: str, start: Stage, model: str | None = None) -> None:
    """Send a job's work: plan then render, or render only (a given layout, a revised one re-queued);
    the render goes to the queue of the job's ``model`` (:func:`render_queue`)."""
    render = app.signature(RENDER_TASK, args=(job_id,), queue=render_queue(model), immutable=True)
    if start == "render":
        render.apply_async()
        return
    plan = app.signature(PLAN_TASK, args=(job_id,), queue=PLAN_QUEUE, immutable=True)
    chain(plan, render).apply_async()
