"""``lmd serve`` (the HTTP API under uvicorn) and ``lmd worker`` (a Celery worker for one queue).

Both read the one settings object (``LMD_*``); neither needs docker: a Redis server is enough.
"""

from __future__ import annotations

import argparse
import os

from lmd.settings import get_settings
from lmd.wiring import check_precision, choose_planner, load_settings

DEFAULT_CONCURRENCY = {"plan": 2, "render": 1}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP API (uvicorn) against the Redis of LMD_REDIS_URL")
    serve.add_argument("--host", help="default: LMD_API_HOST (127.0.0.1)")
    serve.add_argument("--port", type=int, help="default: LMD_API_PORT (8000)")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn processes (the API is stateless); default 1")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_serve)

    worker = subparsers.add_parser("worker", help="run a Celery worker: stage 1 (plan) or stage 2 (render)")
    worker.add_argument("--queues", required=True,
                        help="plan (LLM calls, CPU), render (one process per GPU), or plan,render")
    worker.add_argument("--concurrency", type=int,
                        help="processes of the pool; default 2 for plan (1 with the local planner: one model copy "
                             "per process), 1 for render (1 is the only choice for render)")
    worker.add_argument("--model", metavar="NAME",
                        help="the LMD_MODELS name this render worker loads and serves (queue render.NAME); "
                             "default LMD_WORKER_MODEL, else the first (docs/models.md)")
    worker.add_argument("--name", help="Celery node name; default <queues>-<pid>@<host>")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(handler=_worker)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = load_settings(cached=True)
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        workers=args.workers,
        log_level=args.log_level,
        # slow and numerous clients (docs/service.md "Slow clients"): header deadline, keep-alive, connections
        http="lmd.serving:HeaderTimeoutH11Protocol",
        timeout_keep_alive=settings.api_keep_alive_s,
        limit_concurrency=settings.api_max_connections,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from jobs.queue import create_celery, is_render_queue
    from lmd.cli import CLIError

    settings = load_settings(cached=True)
    queues = worker_queues(settings, args.queues, args.model)
    if any(is_render_queue(q) for q in queues):
        check_precision(settings)  # float16 on a CPU: exit 2 now, not a failed job later
    local_planner = "plan" in queues and choose_planner(settings).kind == "local"
    concurrency = args.concurrency if args.concurrency is not None else min(
        DEFAULT_CONCURRENCY["render" if is_render_queue(q) else q] for q in queues)
    if args.concurrency is None and local_planner:
        concurrency = 1  # each pool process loads its own copy of the local planner's model
    if concurrency < 1:
        raise CLIError("--concurrency must be at least 1")
    if any(is_render_queue(q) for q in queues) and concurrency != 1:
        raise CLIError("a render worker runs one process per GPU: start one `lmd worker --queues render` "
                       "per GPU (LMD_DEVICE=cuda:N) instead of --concurrency > 1")
    app = create_celery(settings)
    app.conf.lmd_preload_pipeline = any(is_render_queue(q) for q in queues)  # worker.tasks loads it in each pool child
    name = args.name or f"{'+'.join(queues)}-{os.getpid()}@%h"
    app.worker_main([
        "worker",
        "--queues", ",".join(queues),
        "--concurrency", str(concurrency),
        "--pool", "prefork",
        "--hostname", name,
        "--loglevel", args.log_level.upper(),
        "--without-gossip",
        "--without-mingle",
    ])
    return 0


def worker_queues(settings, queues_argument: str, model: str | None) -> list[str]:
    """The queues ``--queues`` names, with ``render`` meaning this worker's model's queue when
    LMD_MODELS is set (``--model``, else LMD_WORKER_MODEL, else the first). The chosen model is
    put in LMD_WORKER_MODEL for the pool children, which read the settings again after the fork."""
    from jobs.queue import PLAN_QUEUE, RENDER_QUEUE, is_render_queue, render_queue
    from lmd.cli import CLIError

    queues = [q.strip() for q in queues_argument.split(",") if q.strip()]
    named = [q.removeprefix(RENDER_QUEUE + ".") for q in queues if q.startswith(RENDER_QUEUE + ".")]
    unknown = [q for q in queues if q not in (PLAN_QUEUE, RENDER_QUEUE) and not q.startswith(RENDER_QUEUE + ".")]
    if not queues or unknown:
        raise CLIError(f"--queues must name plan, render (or render.NAME) or both, comma-separated; got {queues_argument!r}")
    render = [q for q in queues if is_render_queue(q)]
    if len(render) > 1:
        raise CLIError("a render worker serves one model: give one render queue")
    if model is not None and named and named[0] != model:
        raise CLIError(f"--model {model} and --queues {render[0]} name different models")
    model = model or (named[0] if named else None)
    if not render:
        if model is not None:
            raise CLIError("--model is for render workers: add render to --queues")
        return queues
    if not settings.models:
        if model is not None:
            raise CLIError(f"--model {model}: LMD_MODELS is unset, so this worker renders LMD_SD_MODEL on queue render")
        return queues
    model = model or settings.worker_model or next(iter(settings.models))
    if model not in settings.models:
        raise CLIError(f"unknown model {model!r}; LMD_MODELS has: {', '.join(settings.models)}")
    os.environ["LMD_WORKER_MODEL"] = model
    get_settings.cache_clear()  # the pool children fork after this and read LMD_WORKER_MODEL
    return [render_queue(model) if is_render_queue(q) else q for q in queues]
