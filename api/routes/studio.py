"""The studio page at ``/`` (static files, no build step) and ``GET /limits``, which it reads first.

The page uses only the public API below it; ``/limits`` is public too (no key needed), so
any client can show the limits before it meets a 422 and knows whether to ask for a key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import SettingsDep
from api.schemas import Limits

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["studio"])


@router.get("/", include_in_schema=False)
def studio() -> FileResponse:
    """The studio: plan, edit, render and refine in a browser."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/limits", response_model=Limits, operation_id="limits")
def limits(settings: SettingsDep) -> Limits:
    """The request limits and defaults (sizes, steps, seeds, text lengths, presets, variants) and whether keys are on."""
    return Limits.of(settings)
