"""Fixtures of the service tests: a private Redis server, the API in-process, real worker processes.

Every service test module gets its own ``redis-server`` on a free port (never the shared
6379, which other tests use), so tests can stop it, flush it, or fill its queues freely.
Workers are real ``lmd worker`` subprocesses, each in its own process group so a test can
SIGKILL a whole worker (main process and pool child) like a crashed container.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from lmd.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway ``redis-server`` subprocess on loopback (no persistence)."""

    def __init__(self, port: int | None = None):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (scripts/test installs it)")
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def private_redis():
    """A private Redis server for one test module."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def service_settings(redis_url: str, data_dir: Path, **overrides) -> Settings:
    """Settings of an in-process API for tests: small limits, fast reaper, the given Redis."""
    values = dict(
        redis_url=redis_url,
        data_dir=data_dir,
        min_size=32,
        max_size=128,
        max_steps=400,
        redis_timeout_s=1.0,
        retry_after_s=2,
        events_poll_s=0.05,
        api_keys=[],
    )
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as ``LMD_*`` environment variables, for worker subprocesses."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        if name == "llm_api_key":
            value = settings.llm_api_key.get_secret_value()
        env[f"LMD_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


class WorkerProcess:
    """``lmd worker --queues <queue>`` as a subprocess in its own process group."""

    def __init__(self, queue: str, env: dict[str, str], log_path: Path, name: str | None = None):
        self.queue = queue
        self.name = name or f"{queue}-test-{time.monotonic_ns()}@{socket.gethostname()}"
        self.log_path = log_path
        full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmd", "worker", "--queues", queue, "--name", self.name,
             "--concurrency", "1", "--log-level", "info"],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, client: redis.Redis, timeout_s: float = 60) -> "WorkerProcess":
        """Until the worker's maintenance thread registered it in Redis (it consumes by then)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if client.exists(f"lmd:worker:{self.name}"):
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} did not become ready; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool child, like a crashed host."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # a pool child left behind
            except ProcessLookupError:
                pass
        self._log.close()


class APIProcess:
    """``lmd serve`` as a subprocess on a free port; ``client()`` is an httpx client for it."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmd", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def wait_ready(self, timeout_s: float = 60) -> "APIProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"lmd serve did not answer; log:\n{self.log_path.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def wait_for_job(client, job_id: str, states: set[str], timeout_s: float = 120, headers: dict | None = None) -> dict:
    """Poll GET /jobs/{id} until its state is one of ``states``."""
    deadline = time.monotonic() + timeout_s
    job = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers or {}).json()
        if job.get("state") in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {sorted(states)}; last seen {job}")
