"""Time the service journey on the tiny local model: ``lmd serve`` + two ``lmd worker`` processes.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.service_journey [--steps 4] [--size 64]

Starts a private redis-server, the fake LLM server, the API and both workers as real
processes (tests/support), then times: startup until ready, the first generate (includes
the render process loading the model), a second generate, and an instruct. CPU, tiny random
weights: the numbers measure the service's overhead, not image quality or GPU speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import redis

from tests.support.fake_llm import FakeLLM
from tests.support.service import APIProcess, RedisServer, WorkerProcess, service_settings, settings_env, wait_for_job
from tests.support.tiny_sd import build_tiny_sd

LAYOUT = {
    "objects": [{"id": "cat", "phrase": "a cat", "box": [40, 200, 200, 200]},
                {"id": "dog", "phrase": "a dog", "box": [300, 180, 180, 240]}],
    "background": "a realistic living room",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lmd-bench-"))
    server = RedisServer().start()
    llm = FakeLLM()
    settings = service_settings(server.url, tmp / "data", sd_model=str(build_tiny_sd(tmp / "sd")), device="cpu",
                                dtype="float32", torch_threads=1, min_size=32, max_size=512)
    env = {**settings_env(settings), **llm.env()}
    timings: dict[str, float] = {}
    processes = []
    try:
        started = time.perf_counter()
        api = APIProcess(env, tmp / "api.log")
        processes.append(api)
        workers = [WorkerProcess(q, env, tmp / f"{q}.log") for q in ("plan", "render")]
        processes.extend(workers)
        api.wait_ready()
        for w in workers:
            w.wait_ready(redis.Redis(port=server.port))
        timings["startup_s"] = time.perf_counter() - started
        client = api.client()
        body = {"prompt": "a cat and a dog", "width": args.size, "height": args.size, "steps": args.steps, "seed": 1}

        def timed(name: str, method: str, path: str, payload: dict) -> dict:
            llm.enqueue(LAYOUT)
            t = time.perf_counter()
            accepted = client.request(method, path, json=payload).json()
            job = wait_for_job(client, accepted["job_id"], {"succeeded", "failed", "canceled"}, timeout_s=600)
            timings[name] = time.perf_counter() - t
            assert job["state"] == "succeeded", job
            return accepted

        first = timed("first_generate_s", "POST", "/generate", body)
        timed("second_generate_s", "POST", "/generate", body)
        timed("instruct_s", "POST", f"/sessions/{first['session_id']}/instruct", {"instruction": "move the dog up"})
        print(json.dumps({"steps": args.steps, "size": args.size, **{k: round(v, 2) for k, v in timings.items()}}))
    finally:
        for p in processes:
            p.stop()
        llm.close()
        server.stop()


if __name__ == "__main__":
    main()
