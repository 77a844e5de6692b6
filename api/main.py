"""The FastAPI application: ``create_app()`` wires settings, the record store, Celery and the routers.

Run it with ``lmd serve`` (uvicorn). Redis being down never hangs a request nor shows a
traceback: the store's calls time out quickly and become 503 with Retry-After, and the
connection pool reconnects by itself once Redis is back.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

from api.routes import generate, health, jobs, sessions
from api.store import Store, StoreConflict, connect
from lmd.settings import Settings, get_settings
from worker.celery_app import create_celery

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.store.redis.close()

    app = FastAPI(
        title="LMD service",
        summary="LLM-grounded diffusion: a prompt becomes a layout, the layout becomes an image.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = Store(connect(settings.redis_url, settings.redis_timeout_s), settings.retention_s)
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

    app.add_exception_handler(redis.RedisError, unavailable)
    app.add_exception_handler(OperationalError, unavailable)
    app.add_exception_handler(StoreConflict, conflict)

    for module in (generate, jobs, sessions, health):
        app.include_router(module.router)
    return app
