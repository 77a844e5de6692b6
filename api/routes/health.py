"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import StoreDep
from api.schemas import Readiness, WorkerView
from jobs.queue import QUEUES

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness)
def readyz(store: StoreDep) -> Readiness:
    """Redis answers (503 otherwise); lists the workers that beat recently and queues nobody serves."""
    store.ping()
    workers = [WorkerView(**w) for w in store.workers()]
    served = {q for w in workers for q in w.queues}
    return Readiness(redis="ok", workers=workers,
                     queues_without_workers=[q for q in QUEUES if q not in served])
