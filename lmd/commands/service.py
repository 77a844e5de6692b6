"""``lmd serve`` (the HTTP API under uvicorn) and ``lmd worker`` (a Celery worker for one queue).

Both read the one settings object (``LMD_*``); neither needs docker: a Redis server is enough.
"""

from __future__ import annotations

import argparse
import os

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
    from jobs.queue import QUEUES, create_celery
    from lmd.cli import CLIError

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise CLIError(f"--queues must name plan, render or both (comma-separated); got {args.queues!r}")
    settings = load_settings(cached=True)
    if "render" in queues:
        check_precision(settings)  # float16 on a CPU: exit 2 now, not a failed job later
    local_planner = "plan" in queues and choose_planner(settings).kind == "local"
    concurrency = args.concurrency if args.concurrency is not None else min(DEFAULT_CONCURRENCY[q] for q in queues)
    if args.concurrency is None and local_planner:
        concurrency = 1  # each pool process loads its own copy of the local planner's model
    if concurrency < 1:
        raise CLIError("--concurrency must be at least 1")
    if "render" in queues and concurrency != 1:
        raise CLIError("a render worker runs one process per GPU: start one `lmd worker --queues render` "
                       "per GPU (LMD_DEVICE=cuda:N) instead of --concurrency > 1")
    app = create_celery(settings)
    app.conf.lmd_preload_pipeline = "render" in queues  # worker.tasks loads it in each pool child
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
