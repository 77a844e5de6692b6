"""The studio page at ``/`` (static files, no build step) and ``GET /limits``, which it reads first.

The page uses only the public API below it; ``/limits`` is public too (no key needed), so
any client can show the limits before it meets a 422 and knows whether to ask for a key.
"""

from __future__ import annotations

from pathlib import Path

import redis
from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import SettingsDep, StoreDep
from api.schemas import Limits
from jobs.queue import is_render_queue
from lmd.capabilities import RenderCapabilities, by_model, common

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["studio"])


@router.get("/", include_in_schema=False)
def studio() -> FileResponse:
    """The studio: plan, edit, render and refine in a browser."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/limits", response_model=Limits, operation_id="limits")
def limits(settings: SettingsDep, store: StoreDep) -> Limits:
    """The request limits and defaults (sizes, steps, seeds, text lengths, presets, variants), whether
    keys are on, and what the live render workers can run (``render``: model, scheduler, variants,
    conditionings, refiner), so that a client offers only what will run. Answers while Redis is
    down too (``render_workers`` null then)."""
    try:
        workers = [w for w in store.workers() if any(map(is_render_queue, w["queues"]))]
    except redis.RedisError:
        return Limits.of(settings)
    found = [RenderCapabilities.model_validate(w["capabilities"]) for w in workers if w.get("capabilities")]
    return Limits.of(settings, common(found), len(workers), by_model(found))
