"""The service journey through a running docker compose stack (the second half of scripts/compose-check).

    python scripts/compose_journey.py --api http://127.0.0.1:PORT --compose "docker-compose -p P -f ..." --out DIR

Steps, each printed with its time: the stack is ready (both workers registered, Redis with
AOF); a generate is polled to its end and its PNG fetched (it carries its parameters); an
instruct revises the session; the studio page loads in Chromium and plans a layout; Redis is
restarted while a render runs and another waits in the queue; the render worker is restarted
gracefully (SIGTERM: the running render finishes first) and then killed (the job is delivered
again). At the end every job it submitted has succeeded and its image can be fetched: nothing
was lost. Exit status 0 when all hold, 1 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from grounded_sd.image_parameters import read_parameters
from tests.support.service import wait_for_job

SMALL = {"width": 64, "height": 64, "steps": 4, "preset": "fast", "seed": 7}
TERMINAL = {"succeeded", "failed", "canceled"}


class Journey:
    def __init__(self, api: str, compose: list[str], out: Path, long_steps: int, long_size: int):
        self.client = httpx.Client(base_url=api, timeout=30)
        self.api, self.compose, self.out = api, compose, out
        self.long = {"prompt": "a cat", "width": long_size, "height": long_size, "steps": long_steps,
                     "preset": "fast", "seed": 11}
        self.jobs: list[str] = []  # every job this journey submitted: all must succeed

    # --- helpers ---------------------------------------------------------------------------
    def post(self, path: str, body: dict) -> dict:
        answer = self.client.post(path, json=body)
        if answer.status_code != 202:
            raise AssertionError(f"POST {path} answered {answer.status_code}: {answer.text}")
        accepted = answer.json()
        self.jobs.append(accepted["job_id"])
        return accepted

    def finish(self, job_id: str, timeout_s: float = 600) -> dict:
        job = wait_for_job(self.client, job_id, TERMINAL, timeout_s=timeout_s)
        if job["state"] != "succeeded":
            raise AssertionError(f"job {job_id} ended {job['state']}: {job.get('error')}")
        return job

    def fetch_image(self, job: dict, name: str) -> Path:
        answer = self.client.get(job["result"]["image_url"])
        if answer.status_code != 200 or not answer.content.startswith(b"\x89PNG"):
            raise AssertionError(f"image of job {job['job_id']}: {answer.status_code} {answer.headers.get('content-type')}")
        path = self.out / f"{name}.png"
        path.write_bytes(answer.content)
        return path

    def rendering(self, job_id: str, timeout_s: float = 300) -> dict:
        """Wait until the render of ``job_id`` has made a step and is not yet done."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job.get("state") in TERMINAL:
                raise AssertionError(f"job {job_id} ended ({job['state']}) before the restart: give it more steps "
                                     "(--long-steps)")
            progress = job.get("progress") or {}
            if job.get("state") == "rendering" and (progress.get("step") or 0) >= 1:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} never started rendering")

    def run_compose(self, *args: str) -> float:
        started = time.monotonic()
        subprocess.run([*self.compose, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        return time.monotonic() - started

    # --- steps -----------------------------------------------------------------------------
    def ready(self, timeout_s: float = 300) -> str:
        deadline = time.monotonic() + timeout_s
        body: dict = {}
        while time.monotonic() < deadline:
            answer = self.client.get("/readyz")
            body = answer.json()
            counts = body.get("worker_counts") or {}
            if answer.status_code == 200 and counts.get("plan", 0) >= 1 and counts.get("render", 0) >= 1:
                if body.get("persistence") != "aof":
                    raise AssertionError(f"Redis does not persist with AOF: {body}")
                return f"workers {counts}, persistence {body['persistence']}"
            time.sleep(1)
        raise AssertionError(f"/readyz never showed both workers: {body}")

    def generate_and_instruct(self) -> str:
        accepted = self.post("/generate", {"prompt": "a cat and a dog", **SMALL})
        job = self.finish(accepted["job_id"])
        params = read_parameters(self.fetch_image(job, "generate"))
        if (params.seed, params.steps, params.width) != (7, 4, 64):
            raise AssertionError(f"the PNG's parameters are not the request's: {params}")
        turn = self.post(f"/sessions/{accepted['session_id']}/instruct", {"instruction": "move the cat to the right"})
        self.fetch_image(self.finish(turn["job_id"]), "instruct")
        session = self.client.get(f"/sessions/{accepted['session_id']}").json()
        if [t["state"] for t in session["turns"]] != ["succeeded", "succeeded"]:
            raise AssertionError(f"session turns: {session['turns']}")
        return f"job {accepted['job_id']} and its instruct succeeded, PNGs carry their parameters"

    def studio(self) -> str:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise AssertionError("chromium is not installed (apt-get install chromium)")
        from playwright.sync_api import sync_playwright

        errors: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
                page.goto(f"{self.api}/")
                page.fill("#prompt", "a cat and a dog")
                page.click("#plan-button")
                page.wait_for_selector("#editor .box")
                boxes = page.locator("#editor .box").count()
            finally:
                browser.close()
        if errors:
            raise AssertionError(f"the studio page: {errors}")
        return f"the page loaded and planned a layout of {boxes} box(es), no errors"

    def restart_redis(self) -> str:
        running = self.post("/generate", self.long)["job_id"]
        queued = self.post("/generate", self.long)["job_id"]  # waits behind it: render runs one at a time
        self.rendering(running)
        took = self.run_compose("restart", "redis")
        first, second = self.finish(running), self.finish(queued)
        self.fetch_image(first, "redis-restart-running")
        self.fetch_image(second, "redis-restart-queued")
        return f"restarted in {took:.1f}s during a render: the running and the queued job both succeeded"

    def restart_worker_gracefully(self) -> str:
        job_id = self.post("/generate", self.long)["job_id"]
        self.rendering(job_id)
        took = self.run_compose("restart", "worker-render")  # SIGTERM, then its stop_grace_period
        job = self.client.get(f"/jobs/{job_id}").json()
        if job["state"] != "succeeded" or job["deliveries"] != 1:
            raise AssertionError(f"a warm shutdown should finish the running render first: {job}")
        self.fetch_image(job, "graceful-restart")
        return f"SIGTERM: the render finished before the worker stopped ({took:.1f}s), one delivery"

    def kill_worker(self) -> str:
        job_id = self.post("/generate", self.long)["job_id"]
        self.rendering(job_id)
        took = self.run_compose("restart", "--timeout", "0", "worker-render")  # SIGKILL at once
        job = self.finish(job_id)
        if job["deliveries"] != 2:
            raise AssertionError(f"a killed render should be delivered again: {job}")
        self.fetch_image(job, "killed-worker")
        return f"killed mid-render and back in {took:.1f}s: the job was delivered again and succeeded"

    def nothing_lost(self) -> str:
        states = {job_id: self.client.get(f"/jobs/{job_id}").json().get("state") for job_id in self.jobs}
        lost = {job_id: state for job_id, state in states.items() if state != "succeeded"}
        if lost:
            raise AssertionError(f"jobs not succeeded at the end: {lost}")
        return f"all {len(states)} jobs succeeded"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", required=True, help="the API's base URL")
    parser.add_argument("--compose", required=True, help="the compose command with its -p and -f options")
    parser.add_argument("--out", type=Path, required=True, help="where the fetched images go")
    parser.add_argument("--long-steps", type=int, default=30, help="steps of the jobs that are interrupted")
    parser.add_argument("--long-size", type=int, default=64, help="their width and height")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    journey = Journey(args.api, shlex.split(args.compose), args.out, args.long_steps, args.long_size)
    steps = [("ready", journey.ready), ("generate + instruct", journey.generate_and_instruct),
             ("studio", journey.studio), ("restart redis mid-job", journey.restart_redis),
             ("restart render worker (SIGTERM)", journey.restart_worker_gracefully),
             ("kill render worker mid-job", journey.kill_worker), ("nothing lost", journey.nothing_lost)]
    for name, step in steps:
        started = time.monotonic()
        try:
            said = step()
        except Exception as exc:  # the verdict names the step and why
            print(f"  FAIL {name} ({time.monotonic() - started:.1f}s): {exc}", flush=True)
            return 1
        print(f"  ok   {name} ({time.monotonic() - started:.1f}s): {said}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
