"""Jobs: state and progress, the image, its overlay, masks and report, live previews, cancel, and a stream of events."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import redis
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import JobDep, OwnerDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.schemas import JobView
from jobs.files import mask_file, report_file, result_file
from jobs.queue import PLAN_QUEUE, render_queue
from jobs.records import JobRecord, new_id
from jobs.store import Store

router = APIRouter(prefix="/jobs", tags=["jobs"])


def waiting_queue(job: JobRecord) -> str | None:
    """The queue a job waits in for a worker to take it; None while a worker holds it or once it ended."""
    if job.state == "queued":
        return render_queue(job.model) if job.layout_given else PLAN_QUEUE
    if job.state == "rendering" and job.worker is None:  # planned (waiting) or requeued
        return render_queue(job.model)
    return None


def notice_of(job: JobRecord, store: Store) -> str | None:
    """What /readyz knows (``queues_without_workers``), said on the job that it stops."""
    queue = waiting_queue(job)
    if queue is None or any(queue in w["queues"] for w in store.workers()):
        return None
    return (f"no {queue} worker is running: the job waits in the queue until one starts "
            f"(lmd worker --queues {queue}); see GET /readyz")


@router.get("/{job_id}", response_model=JobView, operation_id="get_job")
def get_job(job: JobDep, store: StoreDep) -> JobView:
    """State, stage and progress, the layout once planned, the seed, the error of a failed job, and
    ``notice`` when it waits for a worker that no process provides."""
    return JobView.of(job, notice_of(job, store))


def _rendered(job, name: str) -> None:
    """409 unless the job's render has succeeded: a plan-only job (POST /plan) never renders."""
    if job.kind == "plan":
        raise HTTPException(409, f"job {job.job_id} is a plan-only job (POST /plan): it has a layout and no {name}; "
                                 "render the layout with POST /generate")
    if job.state != "succeeded":
        raise HTTPException(409, f"job {job.job_id} is {job.state}; its {name} exists once its render has succeeded")


def _stored_file(job, path: Path, name: str, media_type: str = "image/png") -> FileResponse:
    """A file the job's render wrote: 409 before that render has succeeded (never, for a plan-only
    job), 404 once retention has removed it."""
    _rendered(job, name)
    if not path.is_file():
        raise HTTPException(404, f"the {name} of job {job.job_id} is gone (retention LMD_RETENTION_S passed)")
    return FileResponse(path, media_type=media_type)


@router.get("/{job_id}/image", operation_id="get_image", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
def get_image(job: JobDep, settings: SettingsDep) -> FileResponse:
    """The generated image (PNG of the requested size)."""
    return _stored_file(job, result_file(settings.data_dir, job.job_id, "image"), "image")


@router.get("/{job_id}/overlay", operation_id="get_overlay", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
def get_overlay(job: JobDep, settings: SettingsDep) -> FileResponse:
    """The image with the layout's boxes and phrases drawn on it."""
    return _stored_file(job, result_file(settings.data_dir, job.job_id, "overlay"), "overlay")


@router.get("/{job_id}/masks/{object_id}", operation_id="get_mask", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
def get_mask(job: JobDep, object_id: str, settings: SettingsDep) -> FileResponse:
    """One object's mask (white = the object) as the render used it; the report says its source."""
    _rendered(job, "masks")
    if job.layout is None or object_id not in {o.id for o in job.layout.objects}:
        raise HTTPException(404, f"job {job.job_id} has no object {object_id[:64]!r}")
    path = mask_file(settings.data_dir, job.job_id, object_id)
    if not path.is_file():
        raise HTTPException(404, f"no mask for {object_id!r}: the sd variant makes none, or the files are gone (retention)")
    return FileResponse(path, media_type="image/png")


@router.get("/{job_id}/report", operation_id="get_report", response_class=FileResponse, responses={200: {"content": {"application/json": {}}}})
def get_report(job: JobDep, settings: SettingsDep) -> FileResponse:
    """The render's report (grounded_sd.report.GenerationReport): per object its mask source, area,
    mask/box IoU and energies; per stage its wall time and UNet calls."""
    return _stored_file(job, report_file(settings.data_dir, job.job_id), "report", "application/json")


@router.get("/{job_id}/preview", operation_id="get_preview", response_class=Response, responses={200: {"content": {"image/png": {}}}})
def get_preview(job: JobDep, settings: SettingsDep) -> Response:
    """The latest live preview of a render that asked for them (``previews: true``): a cheap
    latent-to-RGB picture; ``progress.preview`` says its stage and step. 404 until the first one.

    Read whole before answering: the worker replaces the file every few steps."""
    missing = HTTPException(404, f"job {job.job_id} has no preview now (it did not ask for previews, "
                                 "has not reached stage 2, or has finished)")
    if job.progress.preview is None or job.terminal:
        raise missing
    try:
        content = result_file(settings.data_dir, job.job_id, "preview").read_bytes()
    except OSError:
        raise missing from None
    return Response(content, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/{job_id}/cancel", status_code=202, response_model=JobView, operation_id="cancel_job")
def cancel(job: JobDep, store: StoreDep) -> JobView:
    """A queued job ends ``canceled`` now; a running one within one denoising step (its worker checks a flag).

    A finished job is a 409.
    """
    if job.terminal:
        raise HTTPException(409, f"job {job.job_id} already {job.state}; nothing to cancel")
    updated = store.request_cancel(job.job_id)
    if updated is None:
        raise HTTPException(404, f"job {job.job_id!r} not found (expired)")
    return JobView.of(updated)


STREAM_LEASE_S = 60.0


@router.get("/{job_id}/events", response_class=EventSourceResponse, operation_id="job_events",
            responses={200: {"content": {"text/event-stream": {}}}})
async def events(job: JobDep, request: Request, store: StoreDep, settings: SettingsDep,
                 owner: OwnerDep) -> EventSourceResponse:
    """Server-sent events: ``state`` (the job view) whenever state or progress changes.

    When the job has ended, the last ``state`` (the terminal one) is followed by ``end``
    (``{job_id, state}``) and the stream closes; clients should stop listening on ``end``.
    One API key may hold ``LMD_MAX_STREAMS_PER_KEY`` streams open at once (429 beyond).
    """
    stream_id = new_id()
    opened = await run_in_threadpool(store.open_stream, owner, stream_id, settings.max_streams_per_key, STREAM_LEASE_S)
    if not opened:
        raise ApiError(429, "too_many_streams", f"this key already has {settings.max_streams_per_key} event streams "
                       "open (LMD_MAX_STREAMS_PER_KEY); close one or poll GET /jobs/{id}",
                       {"Retry-After": str(settings.retry_after_s)})

    async def stream():
        last = None
        job_id = job.job_id
        renewed = time.monotonic()
        notice, notice_due = None, 0.0
        try:
            while not await request.is_disconnected():
                try:
                    current = await run_in_threadpool(store.get_job, job_id)
                    if time.monotonic() - renewed > STREAM_LEASE_S / 3:
                        await run_in_threadpool(store.renew_stream, owner, stream_id, STREAM_LEASE_S)
                        renewed = time.monotonic()
                except redis.RedisError:
                    yield ServerSentEvent(data='{"detail": "Redis is unreachable; reconnect later"}', event="unavailable",
                                          retry=settings.retry_after_s * 1000)
                    return
                if current is None:
                    yield ServerSentEvent(data='{"detail": "the job expired"}', event="gone")
                    return
                if time.monotonic() >= notice_due:  # the workers are looked up once a second, not every poll
                    notice = await run_in_threadpool(notice_of, current, store)
                    notice_due = time.monotonic() + 1.0
                elif waiting_queue(current) is None:
                    notice = None
                seen = (current.state, current.progress, current.cancel_requested, notice)
                if seen != last:
                    last = seen
                    yield ServerSentEvent(data=JobView.of(current, notice).model_dump_json(), event="state")
                if current.terminal:
                    # An explicit last event: a browser's EventSource reconnects when a stream just closes.
                    yield ServerSentEvent(data=json.dumps({"job_id": job_id, "state": current.state}), event="end")
                    return
                await asyncio.sleep(settings.events_poll_s)
        finally:
            try:
                store.close_stream(owner, stream_id)
            except redis.RedisError:
                pass  # its lease runs out instead

    return EventSourceResponse(stream(), ping=15)
