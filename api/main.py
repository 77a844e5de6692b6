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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.errors import ErrorBody, code_of
from api.middleware import BodyLimit, SecurityHeaders
from api.openapi import complete_openapi

from api.routes import generate, health, jobs, metrics, sessions, studio
from jobs.queue import create_celery
from jobs.store import Store, StoreConflict
from lmd.settings import Settings
from lmd.wiring import load_settings

log = logging.getLogger(__name__)


# What a 422 may echo of the request: each value (input, ctx) and each message, whatever the field.
MAX_ECHO_CHARS = 200
MAX_MESSAGE_CHARS = 400
# Far above the largest valid body (30 objects, the longest prompt and texts: about 20 kB); a
# larger one is refused with 413 before it is read into memory.
MAX_BODY_BYTES = 256 * 1024


def _cut(text: str, most: int = MAX_ECHO_CHARS) -> str:
    return text if len(text) <= most else text[:most] + "..."


def _echo(value: object) -> object:
    """A request value as a 422 may show it: JSON-safe (NaN, Infinity, surrogates, bytes) and short."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        return ascii(value)[:MAX_ECHO_CHARS]
    return value if len(text) <= MAX_ECHO_CHARS else _cut(text)


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
            error["ctx"] = {k: _echo(str(v) if isinstance(v, Exception) else v) for k, v in error["ctx"].items()}
        if "input" in error:
            error["input"] = _echo(error["input"])
        error["msg"] = _cut(str(error.get("msg", "")), MAX_MESSAGE_CHARS).encode("utf-8", "backslashreplace").decode("utf-8")
        error["loc"] = [p if isinstance(p, int) else str(p) for p in error.get("loc", ())]
        detail.append(error)
    return JSONResponse({"detail": detail}, status_code=422)


def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error as ``{"code", "detail"}`` (api.errors), with the exception's headers."""
    body = ErrorBody(code=code_of(exc), detail=str(exc.detail))
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def store_is_full(exc: Exception) -> bool:
    """Redis refused a write because it reached ``maxmemory`` (with ``noeviction``, as compose runs it)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc)


def warn_without_persistence(store: Store) -> str | None:
    """Log (and return) a warning when Redis would lose the records on a restart (docs/service.md)."""
    try:
        mode = store.persistence()
    except redis.RedisError as exc:
        log.warning("could not ask Redis whether it persists its data: %s", exc)
        return None
    if mode == "aof":
        return None
    warning = {
        "none": "Redis runs without persistence: a restart loses every job, session and queued message "
                "(in-flight jobs become 404); start it with --appendonly yes",
        "rdb": "Redis keeps only RDB snapshots: a restart loses the jobs written since the last one; "
               "start it with --appendonly yes",
        "unknown": "could not tell whether Redis persists its data (CONFIG refused); make sure AOF is on",
    }[mode]
    log.warning(warning)
    return warning


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings(cached=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        warn_without_persistence(app.state.store)
        yield
        app.state.store.redis.close()

    # FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc load their scripts, styles and
    # icon from the package's files under /static-offline-docs, not from a CDN: the docs work offline.
    app: FastAPI = FastAPIOffline(
        title="LMD service",
        summary="LLM-grounded diffusion: a prompt becomes a layout, the layout becomes an image.",
        version="0.1.0",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    app.state.settings = settings
    app.state.store = Store.from_settings(settings)
    app.state.celery = create_celery(settings)

    def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
        body = ErrorBody(code="unavailable", detail="the service's Redis is unreachable; retry shortly")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    def conflict(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        body = ErrorBody(code="unavailable", detail="the record changed too often while being updated; retry")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "1"})

    def store_error(request: Request, exc: redis.ResponseError) -> JSONResponse:
        if not store_is_full(exc):
            return unavailable(request, exc)
        log.error("%s %s: Redis is full (maxmemory reached): %s", request.method, request.url.path, exc)
        body = ErrorBody(code="store_full", detail="the service's store is full; retry later")
        return JSONResponse(body.model_dump(), status_code=507, headers={"Retry-After": str(settings.retry_after_s)})

    app.add_exception_handler(redis.ResponseError, store_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(redis.RedisError, unavailable)
    app.add_exception_handler(OperationalError, unavailable)
    app.add_exception_handler(StoreConflict, conflict)

    for module in (generate, jobs, sessions, health, metrics, studio):
        app.include_router(module.router)
    app.openapi = lambda: complete_openapi(app, settings)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, stall_timeout_s=settings.api_body_timeout_s)
    if settings.cors_origins:
        # Off by default: only the operator's listed origins may call the API from a browser page.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    app.add_middleware(SecurityHeaders)  # outermost: every answer carries them, a 413 or a CORS preflight too
    app.mount("/static", StaticFiles(directory=studio.STATIC_DIR), name="static")
    return app
