"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import OperatorDep, SettingsDep, StoreDep
from api.schemas import PlannerView, Readiness, WorkerView
from jobs.queue import queue_names
from lmd.wiring import choose_planner

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    """The process answers (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, operation_id="readyz")
def readyz(store: StoreDep, settings: SettingsDep, operator: OperatorDep) -> Readiness:
    """Redis answers (503 otherwise) and whether it persists; how many workers beat recently per
    queue, and queues nobody serves. The workers' names and pids, and the layout planner the
    settings select (its model and endpoint), only to an operator (``api.deps.is_operator``)."""
    store.ping()
    workers = [WorkerView(**w) for w in store.workers()]
    queues = queue_names(settings)  # plan, and render or render.<name> per LMD_MODELS entry
    counts = {q: sum(q in w.queues for w in workers) for q in queues}
    planner = None
    if operator:
        choice = choose_planner(settings)
        planner = PlannerView(kind=choice.kind, model=choice.model, endpoint=choice.endpoint, reason=choice.reason)
    return Readiness(redis="ok", persistence=store.persistence(), worker_counts=counts,
                     workers=workers if operator else None,
                     queues_without_workers=[q for q in queues if not counts[q]], planner=planner)
