"""How a job moves between states, as pure functions over records (docs/service.md "Job lifecycle").

Each function takes the job as stored and returns the job to store, or None when nothing
changes. ``jobs.store`` runs one of them inside a Redis WATCH transaction; these functions read
no clock and no Redis themselves (``now`` and ``worker_dead`` are passed in), so the rules can
be checked on plain records.

The rules, in one place:

- a finished job (succeeded, failed, canceled) never changes again;
- a worker *claims* a stage before running it: it writes its ``hostname:pid``, a heartbeat and
  ``deliveries + 1``; a job held by a live worker is not claimed again (a duplicate delivery);
- the *redelivery bound*: a job already started ``1 + LMD_MAX_REDELIVERIES`` times ends
  ``failed`` with ``worker_lost`` instead of running again;
- every write of a running job is conditional on the writer still holding it;
- a cancel ends a job nobody holds at once, and only raises a flag on a held one; a held job
  that then fails ends ``canceled`` all the same (the cancel came first);
- the reaper releases a job whose worker stopped beating (or sends a message again for a job
  nobody holds that has not moved for the broker's redelivery period);
- a requested cancel wins at every transition: a claim, a hand-over to the render stage, a
  failure, and the reaper (a lost job whose cancel was requested ends ``canceled``, it is not
  sent again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from layout_planner.layout import Layout

from jobs.records import ErrorCode, JobError, JobRecord, JobState, Progress, Stage


def _never_dead(worker: str) -> bool:
    return False


def delivery_limit(max_redeliveries: int) -> int:
    """How many times a stage may start: the first delivery and ``LMD_MAX_REDELIVERIES`` re-runs."""
    return 1 + max_redeliveries


def is_stale(job: JobRecord, now: float, lost_after_s: float,
             worker_dead: Callable[[str], bool] = _never_dead) -> bool:
    """The holder of a running job is gone: its process is known dead, or its heartbeat is too old."""
    if job.worker is not None and worker_dead(job.worker):
        return True
    return job.heartbeat_at is None or now - job.heartbeat_at > lost_after_s


def ended(job: JobRecord, state: JobState, code: ErrorCode, message: str) -> JobRecord:
    """The job finished ``state`` with an error code and a message; nobody holds it any more."""
    return job.model_copy(update={"state": state, "error": JobError(code=code, message=message), "worker": None})


def worker_lost(job: JobRecord) -> JobRecord:
    """The job hit the redelivery bound: it killed (or outlived) its worker too often to try again."""
    return ended(
        job,
        "failed",
        "worker_lost",
        f"the worker running this job died {job.deliveries} time(s) (killed, out of host memory, or crashed); "
        "the job was not retried again. Try fewer objects, a smaller size, or check the worker's logs.",
    )


def ready_for(job: JobRecord, stage: Stage) -> bool:
    """The job waits for (or runs) ``stage``: plan unless a layout was given, then render."""
    if stage == "plan":
        return job.state in ("queued", "planning") and not job.layout_given
    return job.state == "rendering" or (job.state == "queued" and job.layout_given)


@dataclass(frozen=True)
class Claim:
    """What a claim does: ``stored`` to write (None: nothing), ``claimed`` when the worker may run."""

    stored: JobRecord | None
    claimed: JobRecord | None


def claim(job: JobRecord, stage: Stage, worker: str, now: float, max_deliveries: int, lost_after_s: float,
          worker_dead: Callable[[str], bool] = _never_dead) -> Claim:
    """Take the job's ``stage`` for ``worker``.

    Nothing to do when the job is finished, is not at this stage, or a live worker holds it.
    A job whose cancel was requested ends ``canceled``; one already started ``max_deliveries``
    times ends ``worker_lost``.
    """
    if job.terminal:
        return Claim(None, None)
    if job.cancel_requested:
        return Claim(ended(job, "canceled", "canceled", "canceled before a worker started it"), None)
    if not ready_for(job, stage):
        return Claim(None, None)
    if job.worker is not None and not is_stale(job, now, lost_after_s, worker_dead):
        return Claim(None, None)
    if job.deliveries >= max_deliveries:
        return Claim(worker_lost(job), None)
    taken = job.model_copy(update={
        "state": "planning" if stage == "plan" else "rendering",
        "progress": Progress(stage="planning" if stage == "plan" else "starting"),
        "worker": worker,
        "heartbeat_at": now,
        "deliveries": job.deliveries + 1,
    })
    return Claim(taken, taken)


def held_update(job: JobRecord, worker: str, update: dict) -> JobRecord | None:
    """Change a running job only while ``worker`` still holds it (a reaped worker writes nothing)."""
    if job.terminal or job.worker != worker:
        return None
    return job.model_copy(update=update)


def planned(job: JobRecord, worker: str, layout: Layout) -> JobRecord | None:
    """Stage 1 is done: store the layout and leave the job, unheld, waiting for a render worker;
    a ``plan`` job (POST /plan) ends ``succeeded`` here, its layout being its result."""
    if job.cancel_requested and not job.terminal and job.worker == worker:
        return ended(job, "canceled", "canceled", "canceled after planning, before rendering")
    if job.kind == "plan":
        return held_update(job, worker, {"state": "succeeded", "layout": layout, "worker": None,
                                         "progress": Progress(stage="planned", step=1, total=1)})
    return held_update(job, worker, {
        "state": "rendering", "layout": layout, "worker": None, "heartbeat_at": None,
        "deliveries": 0, "progress": Progress(stage="waiting"),
    })


def finish(job: JobRecord, worker: str, state: JobState, code: ErrorCode | None = None,
           message: str = "") -> JobRecord | None:
    """End a held job: ``succeeded`` (progress completed), or ``failed``/``canceled`` with a code."""
    if job.terminal or job.worker != worker:
        return None
    if code is not None and state == "failed" and job.cancel_requested:
        # A requested cancel wins over a failure that came after it (an LLM call that hung, then failed).
        return ended(job, "canceled", "canceled", "canceled (the stage then failed too; the cancel came first)")
    if code is not None:
        return ended(job, state, code, message)
    done = job.progress.model_copy(update={"step": job.progress.total})
    return job.model_copy(update={"state": state, "worker": None, "progress": done})


def fail(job: JobRecord, code: ErrorCode, message: str) -> JobRecord | None:
    """End an unfinished job ``failed`` whoever holds it (a hard time limit killed its worker);
    ``canceled`` when its cancel was requested first."""
    if job.terminal:
        return None
    if job.cancel_requested:
        return ended(job, "canceled", "canceled", "canceled (the stage then failed too; the cancel came first)")
    return ended(job, "failed", code, message)


def enqueue_failed(job: JobRecord) -> JobRecord:
    """The records were written but the broker refused the job's message."""
    return job.model_copy(update={
        "state": "failed",
        "error": JobError(code="enqueue_failed", message="the job could not be queued (broker unreachable); submit it again"),
    })


def request_cancel(job: JobRecord) -> JobRecord | None:
    """Cancel now if no worker holds the job; otherwise raise the flag its worker checks every step."""
    if job.terminal:
        return None
    if job.worker is None:
        return ended(job, "canceled", "canceled", "canceled before a worker started it")
    return job.model_copy(update={"cancel_requested": True})


@dataclass(frozen=True)
class Reaped:
    """What the reaper does with one job: ``stored`` to write, ``requeue`` the stage to send again."""

    stored: JobRecord | None
    requeue: Stage | None


def reap(job: JobRecord, now: float, lost_after_s: float, max_deliveries: int, unheld_after_s: float | None,
         worker_dead: Callable[[str], bool] = _never_dead) -> Reaped:
    """Release a running job whose worker stopped beating, or fail it past the redelivery bound.

    With ``unheld_after_s``, a job nobody holds that has not changed for that long has its stage
    sent again (its message may be lost; a duplicate is skipped at claim); writing the record
    restarts that period, so this happens at most once per ``unheld_after_s``.
    """
    if job.terminal:
        return Reaped(None, None)
    if job.cancel_requested and (job.worker is None or is_stale(job, now, lost_after_s, worker_dead)):
        # Nobody will check the flag any more: the cancel wins here too, no message is sent again.
        return Reaped(ended(job, "canceled", "canceled", "canceled (its worker was lost before it stopped)"), None)
    if job.worker is None:
        if unheld_after_s is None or now - job.updated_at.timestamp() <= unheld_after_s:
            return Reaped(None, None)
        stage: Stage = "plan" if ready_for(job, "plan") else "render"
        return Reaped(job.model_copy(update={"progress": Progress(stage="requeued")}), stage)
    if not is_stale(job, now, lost_after_s, worker_dead):
        return Reaped(None, None)
    if job.deliveries >= max_deliveries:
        return Reaped(worker_lost(job), None)
    released = job.model_copy(update={"worker": None, "heartbeat_at": None, "progress": Progress(stage="requeued")})
    return Reaped(released, "plan" if job.state == "planning" else "render")


def counters(before: JobRecord, after: JobRecord) -> list[str]:
    """The ``/metrics`` counters a write increments: a job that just finished, by state and error code."""
    if before.terminal or not after.terminal:
        return []
    names = [f"finished:{after.state}"]
    if after.error is not None and after.state == "failed":
        names.append(f"failed:{after.error.code}")
    return names
