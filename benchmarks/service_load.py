"""Load on the API alone: enqueue latency and throughput of ``POST /generate``, and memory per job in Redis.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.service_load [--requests 600] [--concurrency 16]

Starts a private redis-server (AOF on, fsync every second, as documented) and ``lmd serve``
(one uvicorn process) on loopback; no workers run, so every job stays queued and only the
API's path is measured: validation, the rate and cap checks, the records' transaction, the
Celery message. Then reads Redis's own figure for one job's records (``MEMORY USAGE``) and the
growth of ``used_memory`` per job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from tests.support.service import APIProcess, free_port, service_settings, settings_env


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
                                "--appendfsync", "everysec", "--save", "", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(200):
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lmd-load-"))
    redis_process, port = start_redis(tmp)
    url = f"redis://127.0.0.1:{port}/0"
    settings = service_settings(url, tmp / "data", max_active_jobs=10**6, max_active_jobs_per_key=10**6,
                                rate_limit_per_min=10**6, max_size=512)
    api = APIProcess(settings_env(settings), tmp / "api.log").wait_ready()
    raw = redis.Redis(port=port, decode_responses=True)
    body = {"prompt": "a cat on the left and a dog on the right, a red lamp behind them", "width": 512,
            "height": 512, "steps": 50, "seed": 7}
    try:
        with httpx.Client(base_url=api.base_url, timeout=30,
                          limits=httpx.Limits(max_connections=args.concurrency)) as client:
            for _ in range(20):  # warm up (connections, imports, the script cache)
                client.post("/generate", json=body)
            before = int(raw.info("memory")["used_memory"])
            jobs_before = raw.scard("lmd:active")

            def one(_: int) -> tuple[float, int, str | None]:
                started = time.perf_counter()
                response = client.post("/generate", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
                return time.perf_counter() - started, response.status_code, response.json().get("job_id")

            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            elapsed = time.perf_counter() - started
        latencies = [r[0] * 1000 for r in results]
        ok = [r for r in results if r[1] == 202]
        jobs = raw.scard("lmd:active") - jobs_before
        after = int(raw.info("memory")["used_memory"])
        job_id = ok[-1][2]
        job = raw.get(f"lmd:job:{job_id}")
        session_id = json.loads(job)["session_id"]
        record_bytes = {
            "job": raw.memory_usage(f"lmd:job:{job_id}"),
            "session (1 turn)": raw.memory_usage(f"lmd:session:{session_id}"),
            "idempotency": raw.memory_usage(next(raw.scan_iter("lmd:idem:*", count=1000))),
        }
        print(json.dumps({
            "requests": args.requests, "concurrency": args.concurrency, "accepted": len(ok),
            "p50_ms": round(statistics.median(latencies), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(max(latencies), 1), "throughput_per_s": round(args.requests / elapsed, 1),
            "record_bytes": record_bytes, "used_memory_per_job_bytes": round((after - before) / max(1, jobs)),
        }, indent=1))
    finally:
        api.stop()
        redis_process.terminate()
        redis_process.wait(timeout=10)


if __name__ == "__main__":
    main()
