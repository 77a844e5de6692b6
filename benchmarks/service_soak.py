"""Soak: jobs against real workers while workers are SIGKILLed at random and Redis (with AOF) restarts.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.service_soak [--jobs 24] [--events 6] [--seed 1]

A private redis-server with AOF (``--appendonly yes --appendfsync everysec``), the fake LLM
server, ``lmd serve`` and one plan and one render ``lmd worker`` (tiny random SD model, CPU).
The jobs are submitted (with an Idempotency-Key, retried while the API answers 503) while a
chaos loop, every ``--every`` seconds, does one of: SIGKILL the render worker (whole process
group) and start a new one, the same for the plan worker, or stop Redis (SIGTERM: it syncs its
AOF) and start it again on the same port and directory. Then every job is polled until it is
terminal. Prints the counts by final state, the jobs that were lost (404) and the deliveries.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import redis

from tests.support.fake_llm import FakeLLM
from tests.support.service import APIProcess, WorkerProcess, free_port, service_settings, settings_env
from tests.support.tiny_sd import build_tiny_sd

LAYOUT = {"objects": [{"id": "cat", "phrase": "a cat", "box": [0.1, 0.3, 0.45, 0.9]},
                      {"id": "dog", "phrase": "a dog", "box": [0.55, 0.3, 0.95, 0.9]}], "background": "a room"}


class AofRedis:
    """A redis-server with AOF that can be restarted on the same port and data directory."""

    def __init__(self, directory: Path):
        self.port, self.directory, self.process = free_port(), directory, None

    def start(self) -> "AofRedis":
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--appendfsync", "everysec", "--save", "", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(400):
            try:
                client.ping()
                return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: Redis fsyncs the AOF before exiting
        self.process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--events", type=int, default=6, help="chaos events (kills and restarts)")
    parser.add_argument("--every", type=float, default=12.0, help="seconds between chaos events")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    tmp = Path(tempfile.mkdtemp(prefix="lmd-soak-"))
    server = AofRedis(tmp).start()
    llm = FakeLLM()
    llm.default_reply = json.dumps({"objects": [{"id": "cat", "phrase": "a cat", "box": [40, 200, 200, 200]}],
                                    "background": "a room", "negative": ""})
    settings = service_settings(
        f"redis://127.0.0.1:{server.port}/0", tmp / "data", sd_model=str(build_tiny_sd(tmp / "sd")), device="cpu",
        dtype="float32", torch_threads=1, heartbeat_s=0.5, worker_lost_after_s=6.0, reaper_interval_s=1.0,
        max_redeliveries=6, task_soft_time_limit_s=60, task_time_limit_s=90, max_active_jobs=10_000,
        max_active_jobs_per_key=10_000, rate_limit_per_min=10_000, retry_after_s=1)
    env = {**settings_env(settings), **llm.env()}
    api = APIProcess(env, tmp / "api.log").wait_ready()
    workers = {q: WorkerProcess(q, env, tmp / f"{q}.log") for q in ("plan", "render")}
    events: Counter[str] = Counter()
    job_ids: list[str] = []
    done = threading.Event()

    def chaos() -> None:
        for _ in range(args.events):
            if done.wait(args.every):
                return
            what = rng.choice(["kill render", "kill plan", "restart redis"])
            events[what] += 1
            if what == "restart redis":
                server.stop()
                time.sleep(1.0)
                server.start()
            else:
                queue = what.split()[1]
                workers[queue].kill()
                workers[queue] = WorkerProcess(queue, env, tmp / f"{queue}.log")
            print(f"{time.strftime('%H:%M:%S')} chaos: {what}", flush=True)

    started = time.monotonic()
    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    client = httpx.Client(base_url=api.base_url, timeout=10)
    try:
        for i in range(args.jobs):
            body = {"width": 64, "height": 64, "steps": 3, "seed": i}
            body.update({"layout": LAYOUT} if i % 2 else {"prompt": f"a cat number {i}"})
            key = uuid.uuid4().hex
            for _ in range(120):  # 503 while Redis restarts: retry with the same key
                try:
                    response = client.post("/generate", json=body, headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code == 202:
                    job_ids.append(response.json()["job_id"])
                    break
                time.sleep(0.5)
            time.sleep(rng.uniform(0.5, 3.0))
        final: dict[str, dict] = {}
        deadline = time.monotonic() + args.timeout
        while len(final) < len(job_ids) and time.monotonic() < deadline:
            for job_id in job_ids:
                if job_id in final:
                    continue
                try:
                    response = client.get(f"/jobs/{job_id}")
                except httpx.TransportError:
                    continue
                if response.status_code == 404:
                    final[job_id] = {"state": "LOST"}
                elif response.status_code == 200 and response.json()["state"] in ("succeeded", "failed", "canceled"):
                    final[job_id] = response.json()
            time.sleep(1.0)
        done.set()
        states = Counter(j["state"] for j in final.values())
        report = {
            "jobs": args.jobs, "submitted": len(job_ids), "terminal": len(final),
            "not_terminal": len(job_ids) - len(final), "lost": states.pop("LOST", 0),
            "states": dict(states), "errors": dict(Counter(j["error"]["code"] for j in final.values() if j.get("error"))),
            "deliveries": dict(Counter(j.get("deliveries", 0) for j in final.values() if "deliveries" in j)),
            "chaos": dict(events), "elapsed_s": round(time.monotonic() - started, 1),
        }
        print(json.dumps(report, indent=1))
    finally:
        done.set()
        client.close()
        for w in workers.values():
            w.stop()
        api.stop()
        llm.close()
        server.stop()


if __name__ == "__main__":
    main()
