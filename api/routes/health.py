"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import OperatorDep, StoreDep
from api.schemas import Readiness, WorkerView
from jobs.queue import QUEUES

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    """The process answers (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, operation_id="readyz")
def readyz(store: StoreDep, operator: OperatorDep) -> Readiness:
    """Redis answers (503 otherwise); how many workers beat recently per queue, and queues nobody serves.

    The workers' names and pids are listed only to an operator (see ``api.deps.is_operator``).
    """
    store.ping()
    workers = [WorkerView(**w) for w in store.workers()]
    queues = QUEUES
    counts = {q: sum(q in w.queues for w in workers) for q in queues}
    return Readiness(redis="ok", persistence=store.persistence(), worker_counts=counts, workers=workers if operator else None,
                     queues_without_workers=[q for q in queues if not counts[q]])
