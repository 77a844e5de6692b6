"""The FastAPI application: ``create_app()`` wires settings, the record store, Celery and the routers.

Run it with ``lmd serve`` (uvicorn). Redis being down never hangs a request nor shows a
traceback: the store's calls time out quickly and become 503 with Retry-After, and the
connection pool reconnects by itself once Redis is back.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from kombu.exceptions import OperationalError

from api.routes import generate, health, jobs, metrics, sessions, studio
from jobs.queue import create_celery
from jobs.store import Store, StoreConflict
from lmd.settings import Settings
from lmd.wiring import load_settings

log = logging.getLogger(__name__)


MAX_ECHO_CHARS = 200
# Far above the largest valid body (30 objects, the longest prompt and texts: about 20 kB); a
# larger one is refused with 413 before it is read into memory.
MAX_BODY_BYTES = 256 * 1024


def _echo(value: object) -> object:
    """A request value as a 422 may show it: JSON-safe (NaN, Infinity, surrogates, bytes) and short."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        return ascii(value)[:MAX_ECHO_CHARS]
    return value if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 (``detail[].loc`` names the field), but never a 500 while echoing the input.

    The default handler echoes each bad value verbatim: ``NaN`` or ``1e400`` (which JSON
    bodies may carry) cannot be serialised and a 100 kB phrase comes back whole.
    """
    content_type = request.headers.get("content-type", "")
    json_sent = content_type.split(";")[0].strip().lower() in ("application/json", "") or content_type.endswith("+json")
    detail = []
    for error in exc.errors():
        error = {k: v for k, v in error.items() if k != "url"}
        if list(error.get("loc", ())) == ["body"] and not json_sent:
            error["msg"] = f"the body must be a JSON object sent with Content-Type: application/json (got {content_type!r})"
        if "ctx" in error:
            error["ctx"] = {k: str(v) if isinstance(v, Exception) else _echo(v) for k, v in error["ctx"].items()}
        if "input" in error:
            error["input"] = _echo(error["input"])
        error["msg"] = str(error.get("msg", ""))[:1000].encode("utf-8", "backslashreplace").decode("utf-8")
        error["loc"] = [p if isinstance(p, int) else str(p) for p in error.get("loc", ())]
        detail.append(error)
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings(cached=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.store.redis.close()

    app = FastAPI(
        title="LMD service",
        summary="LLM-grounded diffusion: a prompt becomes a layout, the layout becomes an image.",
        version="0.1.0",
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.settings = settings
    app.state.store = Store.from_settings(settings)
    app.state.celery = create_celery(settings)

    def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "the service's Redis is unreachable; retry shortly"},
            status_code=503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    def conflict(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(redis.RedisError, unavailable)
    app.add_exception_handler(OperationalError, unavailable)
    app.add_exception_handler(StoreConflict, conflict)

    for module in (generate, jobs, sessions, health, metrics, studio):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=studio.STATIC_DIR), name="static")
    return app
