"""The job and session records in Redis: the service's source of truth (docs/service.md "Records and retention").

Celery carries messages; these records carry state. Every record expires after the retention
setting, refreshed on each write. A change is a read-modify-write under WATCH around one pure
function of ``jobs.transitions``, so concurrent writers (the API cancelling, a worker reporting
progress, a reaper) never lose each other's updates and a finished job never moves again.

This module imports neither FastAPI nor torch: the API and the workers both use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs import transitions
from jobs.records import ErrorCode, IdempotencyRecord, JobRecord, JobState, SessionRecord, SessionTurn, Stage, utcnow
from layout_planner.layout import Layout

_CONFLICT_ATTEMPTS = 50
RENDER_BUCKETS_S = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class StoreConflict(RuntimeError):
    """A record kept changing under us for too many attempts (bounded optimistic locking)."""


def this_worker() -> str:
    """The identity a worker process writes into the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_dead(worker: str) -> bool:
    """True when ``worker`` ran on this host and its process is gone (a killed render child)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails fast when Redis is down and reconnects by itself when it is back.

    Short socket timeouts bound every call; the connection pool drops broken connections and
    opens new ones on the next command, so no restart is needed after an outage.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        health_check_interval=10,
        decode_responses=True,
    )


class Store:
    """Typed access to the service's records in one Redis database."""

    def __init__(self, client: redis.Redis, retention_s: int, prefix: str = "lmd"):
        self.redis = client
        self.retention_s = retention_s
        self.prefix = prefix

    @classmethod
    def from_settings(cls, settings) -> "Store":
        """The store of ``LMD_REDIS_URL`` with the service's timeouts and retention."""
        return cls(connect(settings.redis_url, settings.redis_timeout_s), settings.retention_s)

    # --- keys ----------------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def session_key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def idempotency_key(self, owner: str | None, route: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}:idem:{owner or '-'}:{route}:{digest}"

    @property
    def active_key(self) -> str:
        """A set of the ids of jobs not yet finished: what the reaper scans."""
        return f"{self.prefix}:active"

    def worker_key(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def stats_key(self) -> str:
        """A hash of counters for GET /metrics: finished jobs by state and error code, render durations."""
        return f"{self.prefix}:stats"

    # --- reads ---------------------------------------------------------------------------------
    def ping(self) -> None:
        self.redis.ping()

    def get_job(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self.job_key(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def get_jobs(self, job_ids: list[str]) -> dict[str, JobRecord]:
        if not job_ids:
            return {}
        raws = self.redis.mget([self.job_key(j) for j in job_ids])
        return {j: JobRecord.model_validate_json(r) for j, r in zip(job_ids, raws) if r}

    def get_session(self, session_id: str) -> SessionRecord | None:
        raw = self.redis.get(self.session_key(session_id))
        return SessionRecord.model_validate_json(raw) if raw else None

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))

    def active_count(self) -> int:
        return int(self.redis.scard(self.active_key))

    # --- creation ------------------------------------------------------------------------------
    def create_job(
        self,
        job: JobRecord,
        session: SessionRecord,
        idempotency: tuple[str, IdempotencyRecord] | None = None,
    ) -> tuple[JobRecord | None, IdempotencyRecord | None]:
        """Store a new job and append its turn to ``session``, atomically with the idempotency claim.

        ``session`` is the session as the caller read it (or a new one). The turn number is
        assigned here. Returns ``(job, None)`` on success, or ``(None, earlier)`` when the
        Idempotency-Key was already used: nothing is written then.
        """
        skey = self.session_key(session.session_id)
        watches = [skey] + ([idempotency[0]] if idempotency else [])

        def attempt(pipe: redis.client.Pipeline) -> tuple[JobRecord | None, IdempotencyRecord | None]:
            if idempotency:
                raw = pipe.get(idempotency[0])
                if raw:
                    return None, IdempotencyRecord.model_validate_json(raw)
            raw_session = pipe.get(skey)
            current = SessionRecord.model_validate_json(raw_session) if raw_session else session
            turn = len(current.turns) + 1
            created = job.model_copy(update={"turn": turn})
            updated = current.model_copy(
                update={
                    "turns": [*current.turns, SessionTurn(turn=turn, kind=job.kind, text=job.prompt, job_id=job.job_id)],
                    "updated_at": utcnow(),
                }
            )
            pipe.multi()
            pipe.set(self.job_key(job.job_id), created.model_dump_json(), ex=self.retention_s)
            pipe.set(skey, updated.model_dump_json(), ex=self.retention_s)
            for earlier in current.turns:  # a session's turns expire together
                pipe.expire(self.job_key(earlier.job_id), self.retention_s)
            pipe.sadd(self.active_key, job.job_id)
            if idempotency:
                claim = idempotency[1].model_copy(update={"turn": turn})
                pipe.set(idempotency[0], claim.model_dump_json(), ex=self.retention_s)
            return created, None

        return self._transaction(attempt, *watches)

    def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        raw = self.redis.get(key)
        return IdempotencyRecord.model_validate_json(raw) if raw else None

    def idempotency_used(self, key: str) -> bool:
        return bool(self.redis.exists(key))

    def forget_idempotency(self, key: str) -> None:
        self.redis.delete(key)

    # --- changes ---------------------------------------------------------------------------------
    def update_job(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        """Apply ``change`` to the stored job under WATCH; ``change`` returns None to leave it as is.

        Returns the record as stored afterwards (None when the job does not exist).
        """
        key = self.job_key(job_id)

        def attempt(pipe: redis.client.Pipeline) -> JobRecord | None:
            raw = pipe.get(key)
            if raw is None:
                return None
            job = JobRecord.model_validate_json(raw)
            new = change(job)
            if new is None:
                return job
            new = new.model_copy(update={"updated_at": utcnow()})
            pipe.multi()
            pipe.set(key, new.model_dump_json(), ex=self.retention_s)
            if new.terminal:
                pipe.srem(self.active_key, job_id)
                pipe.delete(self.cancel_key(job_id))
            for counter in transitions.counters(job, new):
                pipe.hincrby(self.stats_key, counter, 1)
            return new

        return self._transaction(attempt, key)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel now if no worker holds the job; otherwise raise the flag its worker checks every step."""
        job = self.update_job(job_id, transitions.request_cancel)
        if job is not None and not job.terminal:
            self.redis.set(self.cancel_key(job_id), "1", ex=self.retention_s)
        return job

    def claim(self, job_id: str, stage: Stage, worker: str, max_deliveries: int, lost_after_s: float) -> JobRecord | None:
        """Take the job's ``stage`` for ``worker``; None when there is nothing to do (``transitions.claim``)."""
        outcome: list[transitions.Claim] = []

        def change(job: JobRecord) -> JobRecord | None:
            outcome[:] = [transitions.claim(job, stage, worker, time.time(), max_deliveries, lost_after_s, worker_dead)]
            return outcome[0].stored

        self.update_job(job_id, change)
        return outcome[0].claimed if outcome else None

    def held_update(self, job_id: str, worker: str, update: dict) -> JobRecord | None:
        """Change a running job only while ``worker`` still holds it; None when it no longer does."""
        return self._held(job_id, lambda job: transitions.held_update(job, worker, update))

    def hand_to_render(self, job_id: str, worker: str, layout: Layout) -> JobRecord | None:
        """Store stage 1's layout and leave the job waiting for a render worker; None when no longer held."""
        return self._held(job_id, lambda job: transitions.planned(job, worker, layout))

    def finish(self, job_id: str, worker: str, state: JobState, code: ErrorCode | None = None, message: str = "") -> JobRecord | None:
        """End a held job: ``succeeded``, or ``failed``/``canceled`` with an error code and message."""
        return self.update_job(job_id, lambda job: transitions.finish(job, worker, state, code, message))

    def fail(self, job_id: str, code: ErrorCode, message: str) -> JobRecord | None:
        """End an unfinished job ``failed`` whoever holds it (a hard time limit killed its worker)."""
        return self.update_job(job_id, lambda job: transitions.fail(job, code, message))

    def mark_enqueue_failed(self, job_id: str) -> JobRecord | None:
        return self.update_job(job_id, transitions.enqueue_failed)

    # --- metrics ---------------------------------------------------------------------------------
    def record_render(self, seconds: float) -> None:
        """Count a succeeded render's duration into the histogram buckets of ``RENDER_BUCKETS_S``."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.stats_key, "render:count", 1)
            pipe.hincrbyfloat(self.stats_key, "render:sum", seconds)
            for bound in RENDER_BUCKETS_S:
                if seconds <= bound:
                    pipe.hincrby(self.stats_key, f"render:le:{bound:g}", 1)
            pipe.execute()

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.redis.hgetall(self.stats_key).items()}

    def active_states(self) -> dict[str, int]:
        """Unfinished jobs by state (the records of the active set)."""
        counts: dict[str, int] = {}
        for job in self.get_jobs(sorted(self.redis.smembers(self.active_key))).values():
            if not job.terminal:
                counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    # --- sessions --------------------------------------------------------------------------------
    def conversation(self, session_id: str, before_turn: int) -> list[tuple[str, Layout]]:
        """(text, layout) of the session's succeeded turns before ``before_turn``: what a revision sees."""
        session = self.get_session(session_id)
        if session is None:
            return []
        earlier = [t for t in session.turns if t.turn < before_turn]
        jobs = self.get_jobs([t.job_id for t in earlier])
        turns = []
        for t in earlier:
            job = jobs.get(t.job_id)
            if job is not None and job.state == "succeeded" and job.layout is not None:
                turns.append((t.text, job.layout))
        return turns

    # --- workers and the reaper -----------------------------------------------------------------
    def register_worker(self, name: str, queues: list[str], ttl_s: float) -> None:
        payload = json.dumps({"name": name, "queues": queues, "pid": os.getpid(), "seen_at": time.time()})
        self.redis.set(self.worker_key(name), payload, px=max(1000, int(ttl_s * 1000)))

    def unregister_worker(self, name: str) -> None:
        self.redis.delete(self.worker_key(name))

    def workers(self) -> list[dict]:
        keys = list(self.redis.scan_iter(match=self.worker_key("*"), count=100))
        raws = self.redis.mget(keys) if keys else []
        return sorted((json.loads(r) for r in raws if r), key=lambda w: w["name"])

    def reap_lost(self, lost_after_s: float, max_deliveries: int,
                  unheld_after_s: float | None = None) -> list[tuple[str, Stage]]:
        """Release running jobs whose worker stopped beating; return (job_id, stage) to re-enqueue.

        The rules are ``transitions.reap``'s; see docs/service.md "Lost workers".
        """
        requeue: list[tuple[str, Stage]] = []
        now = time.time()
        for job_id in self.redis.smembers(self.active_key):
            outcome: list[transitions.Reaped] = []

            def change(job: JobRecord) -> JobRecord | None:
                outcome[:] = [transitions.reap(job, now, lost_after_s, max_deliveries, unheld_after_s, worker_dead)]
                return outcome[0].stored

            if self.update_job(job_id, change) is None:
                self.redis.srem(self.active_key, job_id)  # the record expired
            if outcome and outcome[0].requeue is not None:
                requeue.append((job_id, outcome[0].requeue))
        return requeue

    # --- plumbing --------------------------------------------------------------------------------
    def _held(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        """Apply a change that only its holder may make; the stored result, or None when it was not made."""
        applied: list[JobRecord] = []

        def attempt(job: JobRecord) -> JobRecord | None:
            applied[:] = [new] if (new := change(job)) is not None else []
            return new

        self.update_job(job_id, attempt)
        return applied[0] if applied else None

    def _transaction(self, attempt: Callable, *keys: str):
        for _ in range(_CONFLICT_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    outcome = attempt(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    return outcome
                except redis.WatchError:
                    continue
        raise StoreConflict(f"records {list(keys)} changed {_CONFLICT_ATTEMPTS} times while being updated")
