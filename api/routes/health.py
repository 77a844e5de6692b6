"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SettingsDep, StoreDep
from api.schemas import PlannerView, Readiness, WorkerView
from jobs.queue import QUEUES
from lmd.wiring import choose_planner

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness)
def readyz(store: StoreDep, settings: SettingsDep) -> Readiness:
    """Redis answers (503 otherwise); lists the workers that beat recently, queues nobody serves, and
    the layout planner the settings select (plan workers share the API's settings) and why."""
    store.ping()
    workers = [WorkerView(**w) for w in store.workers()]
    served = {q for w in workers for q in w.queues}
    choice = choose_planner(settings)
    return Readiness(redis="ok", workers=workers,
                     queues_without_workers=[q for q in QUEUES if q not in served],
                     planner=PlannerView(kind=choice.kind, model=choice.model, endpoint=choice.endpoint, reason=choice.reason))
