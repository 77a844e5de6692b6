"""Load on the API alone: enqueue latency and throughput of ``POST /generate``, and memory per job in Redis.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.service_load [--requests 600] [--concurrency 16]
        [--keys 20] [--streams 300] [--max-streams-per-key 20] [--cors] [--preflight-every 10]

Starts a private redis-server (AOF on, fsync every second, as documented) and ``lmd serve``
(one uvicorn process) on loopback; no workers run, so every job stays queued and only the
API's path is measured: validation, the rate and cap checks, the records' transaction, the
Celery message. Then reads Redis's own figure for one job's records (``MEMORY USAGE``) and the
growth of ``used_memory`` per job.

What a busy deployment adds to that path, each optional:

- ``--keys K``: the API runs with K tenant keys (``LMD_API_KEYS``); the load's requests take
  them in turn. Without it the API runs open, as in the first rows of BENCHMARKS.md.
- ``--streams N``: N ``GET /jobs/{id}/events`` streams (one queued job each) are opened across
  the K keys in turn and held while the load runs. Each stream re-reads its job every
  ``LMD_EVENTS_POLL_S`` (the default, 0.5 s, is used here), so their cost shows while the API
  is otherwise idle (its CPU, Redis's commands per second) and in the load's latency. A key
  holds at most ``--max-streams-per-key``; streams past it must be refused with a 429
  ``too_many_streams`` carrying Retry-After, and are counted apart (``clean`` when they are).
- ``--cors``: the API runs with origins configured (``LMD_CORS_ORIGINS``); every request sends
  an allowed ``Origin`` and one preflight ``OPTIONS /generate`` goes out per
  ``--preflight-every`` POSTs, timed on its own.

The API's memory is its processes' resident set (psutil), read before the streams, with
them open, at its peak under the load (sampled every 0.1 s) and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import redis

from lmd.settings import Settings
from tests.support.service import APIProcess, free_port, service_settings, settings_env

ORIGIN = "https://studio.example"
ORIGINS = [ORIGIN, "https://app.example", "https://admin.example", "http://localhost:5173"]
BODY = {"prompt": "a cat on the left and a dog on the right, a red lamp behind them", "width": 512,
        "height": 512, "steps": 50, "seed": 7}
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}


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


def spread(latencies_ms: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(latencies_ms), 1), "p99_ms": round(percentile(latencies_ms, 0.99), 1),
            "max_ms": round(max(latencies_ms), 1)}


def rss_mb(process: psutil.Process) -> float:
    """Resident memory of ``lmd serve`` and any processes it started (uvicorn workers), in MB."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


def headers_for(keys: list[str], i: int, cors: bool) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"} if keys else {}
    if cors:
        headers["Origin"] = ORIGIN
    return headers


class Streams:
    """Event streams held open by an asyncio loop of their own (one thread), until :meth:`close`.

    A stream counts as ``held`` once its first ``state`` event arrived; a refused one keeps its
    status, its error code and whether Retry-After came with it; a held one that ends before
    :meth:`close` is ``dropped``; one neither held nor refused ``failed``.
    """

    def __init__(self, base_url: str, targets: list[tuple[str, dict[str, str]]]):
        self.base_url, self.targets = base_url, targets
        self.held = 0
        self.refused: list[dict] = []
        self.dropped: list[str] = []  # held, then ended before close(): why
        self.failed: list[str] = []  # neither held nor refused: why
        self.loop = asyncio.new_event_loop()
        self.all_answered = threading.Event()
        self.answered = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def open(self, timeout_s: float = 300) -> "Streams":
        self.thread.start()
        self.future = asyncio.run_coroutine_threadsafe(self._hold_all(), self.loop)
        if not self.all_answered.wait(timeout_s):
            raise RuntimeError(f"only {self.answered} of {len(self.targets)} streams answered in {timeout_s} s")
        return self

    def _answer(self) -> None:
        self.answered += 1
        if self.answered == len(self.targets):
            self.all_answered.set()

    async def _hold_all(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(30, read=None), limits=limits) as client:
            await asyncio.gather(*(self._hold(client, job_id, headers) for job_id, headers in self.targets))

    async def _hold(self, client: httpx.AsyncClient, job_id: str, headers: dict[str, str]) -> None:
        first, reason = True, ""
        try:
            async with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as response:
                if response.status_code != 200:
                    body = json.loads(await response.aread())
                    self.refused.append({"status": response.status_code, "code": body.get("code"),
                                         "retry_after": "retry-after" in response.headers})
                    self._answer()
                    return
                async for line in response.aiter_lines():
                    if first and line.startswith("event: state"):
                        first = False
                        self.held += 1
                        self._answer()
                    elif line.startswith("event:") and not line.startswith("event: state"):
                        reason = line  # end, gone or unavailable: the stream is closing
            reason = f"closed after {reason}" if reason else "closed"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (counted, and the run goes on)
            reason = type(exc).__name__
        if first:
            self.failed.append(reason)
            self._answer()
        else:
            self.dropped.append(reason)

    def close(self) -> None:
        if self.thread.is_alive():
            self.future.cancel()
            time.sleep(0.5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def idle_cost(api: psutil.Process, raw: redis.Redis, seconds: float) -> dict:
    """The API's CPU and Redis's command rate while no request comes: what open streams cost alone."""
    processes = [api, *api.children(recursive=True)]
    cpu_before = sum(sum(p.cpu_times()[:2]) for p in processes)
    commands_before = int(raw.info("stats")["total_commands_processed"])
    calls_before = {name: stat["calls"] for name, stat in raw.info("commandstats").items()}
    time.sleep(seconds)
    cpu = sum(sum(p.cpu_times()[:2]) for p in processes) - cpu_before
    commands = int(raw.info("stats")["total_commands_processed"]) - commands_before
    calls = {name.removeprefix("cmdstat_"): round((stat["calls"] - calls_before.get(name, 0)) / seconds)
             for name, stat in raw.info("commandstats").items()}
    busiest = dict(sorted(((n, c) for n, c in calls.items() if c), key=lambda item: -item[1])[:4])
    return {"seconds": seconds, "api_cpu_percent": round(100 * cpu / seconds, 1),
            "redis_commands_per_s": round(commands / seconds), "busiest_commands_per_s": busiest,
            "redis_keys": raw.dbsize()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keys", type=int, default=0, help="tenant API keys (0: the API runs open)")
    parser.add_argument("--streams", type=int, default=0, help="event streams held open during the load")
    parser.add_argument("--max-streams-per-key", type=int, default=Settings.model_fields["max_streams_per_key"].default)
    parser.add_argument("--cors", action="store_true", help="configure CORS origins and send Origin headers")
    parser.add_argument("--preflight-every", type=int, default=10, help="one OPTIONS preflight per this many POSTs (--cors)")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds the idle cost is measured over")
    args = parser.parse_args()
    if args.streams and not args.keys:
        parser.error("--streams needs --keys (the per-key stream limit is what is measured)")

    tmp = Path(tempfile.mkdtemp(prefix="lmd-load-"))
    redis_process, port = start_redis(tmp)
    url = f"redis://127.0.0.1:{port}/0"
    keys = [f"load-key-{i}-{uuid.uuid4().hex[:8]}" for i in range(args.keys)]
    settings = service_settings(url, tmp / "data", max_active_jobs=10**6, max_active_jobs_per_key=10**6,
                                rate_limit_per_min=10**6, max_size=512, api_keys=keys,
                                max_streams_per_key=args.max_streams_per_key,
                                events_poll_s=Settings.model_fields["events_poll_s"].default,
                                cors_origins=ORIGINS if args.cors else [])
    api = APIProcess(settings_env(settings), tmp / "api.log").wait_ready(timeout_s=600)  # a shared machine is slow to import
    api_process = psutil.Process(api.process.pid)
    raw = redis.Redis(port=port, decode_responses=True)
    streams = None
    try:
        with httpx.Client(base_url=api.base_url, timeout=30,
                          limits=httpx.Limits(max_connections=args.concurrency)) as client:
            for i in range(20):  # warm up (connections, imports, the script cache)
                client.post("/generate", json=BODY, headers=headers_for(keys, i, args.cors))
            rss = {"before_streams": rss_mb(api_process)}
            idle = {"without_streams": idle_cost(api_process, raw, args.idle_s)}
            if args.streams:
                targets = []
                for i in range(args.streams):  # one queued job per stream, owned by the stream's key
                    headers = headers_for(keys, i, args.cors)
                    targets.append((client.post("/generate", json=BODY, headers=headers).json()["job_id"], headers))
                streams = Streams(api.base_url, targets).open()
                time.sleep(1.0)  # every stream has polled its job at least once
                rss["streams_open"] = rss_mb(api_process)
                idle["with_streams"] = idle_cost(api_process, raw, args.idle_s)
            before = int(raw.info("memory")["used_memory"])
            jobs_before = raw.scard("lmd:active")

            def one(i: int) -> tuple[float, int | str, str | None, bool, float | None]:
                headers = headers_for(keys, i, args.cors)
                preflight_ms = None
                if args.cors and i % args.preflight_every == 0:
                    started = time.perf_counter()
                    try:
                        answer = client.options("/generate", headers={"Origin": ORIGIN, **PREFLIGHT})
                        preflight_ms = (time.perf_counter() - started) * 1000 if answer.status_code == 200 else -1.0
                    except httpx.TransportError:
                        preflight_ms = -1.0  # counted with the refused ones
                started = time.perf_counter()
                try:
                    response = client.post("/generate", json=BODY, headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
                except httpx.TransportError as exc:  # counted (as its time until then), and the run goes on
                    return time.perf_counter() - started, type(exc).__name__, None, False, preflight_ms
                allowed = response.headers.get("access-control-allow-origin") == ORIGIN
                return (time.perf_counter() - started, response.status_code, response.json().get("job_id"), allowed,
                        preflight_ms)

            peak = [rss_mb(api_process)]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.1):
                    peak.append(rss_mb(api_process))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            elapsed = time.perf_counter() - started
            done.set()
            sampler.join()
            rss["peak_under_load"] = max(peak)
            rss["end"] = rss_mb(api_process)
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
        report = {
            "requests": args.requests, "concurrency": args.concurrency, "keys": args.keys, "accepted": len(ok),
            "not_accepted": dict(Counter(str(r[1]) for r in results if r[1] != 202)),
            **spread(latencies), "throughput_per_s": round(args.requests / elapsed, 1),
            "record_bytes": record_bytes, "used_memory_per_job_bytes": round((after - before) / max(1, jobs)),
            "api_rss_mb": rss, "idle": idle,
        }
        if args.streams:
            refused = streams.refused
            report["streams"] = {
                "asked": args.streams, "max_per_key": args.max_streams_per_key, "held": streams.held,
                "held_at_end": streams.held - len(streams.dropped), "dropped": streams.dropped[:10],
                "failed": streams.failed[:10],
                "refused": len(refused),
                "refused_clean_429": sum(r["status"] == 429 and r["code"] == "too_many_streams" and r["retry_after"]
                                         for r in refused),
                "expected_refusals": sum(max(0, len(range(k, args.streams, args.keys)) - args.max_streams_per_key)
                                         for k in range(args.keys)),
            }
        if args.cors:
            preflights = [r[4] for r in results if r[4] is not None]
            report["cors"] = {
                "origins_configured": len(ORIGINS), "posts_allowed": sum(r[3] for r in results),
                "preflights": len(preflights), "preflights_refused_or_failed": sum(p < 0 for p in preflights),
                "preflight": spread([p for p in preflights if p >= 0] or [0.0]),
            }
        print(json.dumps(report, indent=1))
    finally:
        if streams is not None:
            streams.close()
        api.stop()
        redis_process.terminate()
        redis_process.wait(timeout=10)


if __name__ == "__main__":
    main()
