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
import math
import os
import socket
import time
from typing import Callable

import redis
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from jobs import transitions
from jobs.records import ErrorCode, IdempotencyRecord, JobRecord, JobState, SessionRecord, SessionTurn, Stage, utcnow
from layout_planner.layout import Layout

_CONFLICT_ATTEMPTS = 50
RENDER_BUCKETS_S = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class StoreConflict(RuntimeError):
    """A record kept changing under us for too many attempts (bounded optimistic locking)."""


class Refused(Exception):
    """A new job was not admitted; ``code`` says why (``api.errors`` maps it to an HTTP answer)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# Admission and creation in one step, run inside the MULTI of ``Store.create_job`` (so only when
# the WATCHed session and Idempotency-Key are unchanged): the active-jobs caps are checked and
# the records written by one script, so a burst of concurrent requests cannot all pass the check.
# KEYS: job, session, active, owner's active, [idempotency]; ARGV: job json, session json,
# retention, global cap, per-key cap, [idempotency json]. Returns "ok", "full" or "key_full".
_CREATE = """
local active = redis.call('SCARD', KEYS[3])
if active >= tonumber(ARGV[4]) then return 'full' end
if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[5]) then return 'key_full' end
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
redis.call('SADD', KEYS[3], ARGV[6])
redis.call('SADD', KEYS[4], ARGV[6])
redis.call('EXPIRE', KEYS[4], ttl)
if KEYS[5] then redis.call('SET', KEYS[5], ARGV[7], 'EX', ttl) end
return 'ok'
"""


def process_host() -> str:
    """The host part of a worker's identity: the hostname and, where /proc shows it, the PID namespace.

    Containers on the host's network share its hostname but not its process table; without the
    namespace one would judge another's pids (and re-enqueue a live render as lost).
    """
    try:
        return f"{socket.gethostname()}/pidns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def this_worker() -> str:
    """The identity a worker process writes into the jobs it runs."""
    return f"{process_host()}:{os.getpid()}"


def worker_dead(worker: str) -> bool:
    """True when ``worker`` ran on this host, in this PID namespace, and its process is gone (a killed render child)."""
    host, _, pid = worker.rpartition(":")
    if host != process_host() or not pid.isdigit():
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


# One open event stream of a key: a member of the key's sorted set, scored by when its lease ends.
# KEYS: the key's streams; ARGV: now, stream id, most streams, lease seconds. 1: opened, 0: too many.
_OPEN_STREAM = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4])) + 1)
return 1
"""


class Store:
    """Typed access to the service's records in one Redis database."""

    def __init__(self, client: redis.Redis, retention_s: int, prefix: str = "lmd",
                 ended_retention_s: int | None = None):
        self.redis = client
        self.retention_s = retention_s
        # Failed and canceled jobs are kept shorter: they cost the same memory and are worth less.
        self.ended_retention_s = min(ended_retention_s or retention_s, retention_s)
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        # The rate limiter's lists live under <prefix>:rate:<owner> on this same connection pool.
        self._rate = MovingWindowRateLimiter(RedisStorage("redis://", connection_pool=client.connection_pool,
                                                          key_prefix=f"{prefix}:rate"))
        self._open_stream = client.register_script(_OPEN_STREAM)

    @classmethod
    def from_settings(cls, settings) -> "Store":
        """The store of ``LMD_REDIS_URL`` with the service's timeouts and retentions."""
        return cls(connect(settings.redis_url, settings.redis_timeout_s), settings.retention_s,
                   ended_retention_s=settings.failed_retention_s)

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

    def owner_active_key(self, owner: str | None) -> str:
        """A set of one API key's unfinished jobs (``-``: no keys configured)."""
        return f"{self.prefix}:active:{owner or '-'}"

    def owner_sessions_key(self, owner: str | None) -> str:
        """A sorted set of one API key's session ids, scored by the time of their latest turn."""
        return f"{self.prefix}:sessions:{owner or '-'}"

    def streams_key(self, owner: str | None) -> str:
        return f"{self.prefix}:streams:{owner or '-'}"

    def worker_key(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    @property
    def workers_key(self) -> str:
        """A set of the names of registered workers: ``workers()`` reads it instead of scanning
        the keyspace, whose cost grew with every job stored (each event stream asks each second)."""
        return f"{self.prefix}:workers"

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
        *,
        max_active: int = 10**9,
        max_active_per_key: int = 10**9,
        max_turns: int = 10**9,
        guard: Callable[[SessionRecord, dict[str, JobRecord]], None] | None = None,
    ) -> tuple[JobRecord | None, IdempotencyRecord | None]:
        """Store a new job and append its turn to ``session``, atomically with every check that admits it.

        ``session`` is the session as the caller read it (or a new one). The turn number is
        assigned here. Returns ``(job, None)`` on success, or ``(None, earlier)`` when the
        Idempotency-Key was already used: nothing is written then. Raises :class:`Refused` when
        the session has ``max_turns`` turns, when ``guard(session, its jobs)`` raises it (an
        instruct's "the latest turn has finished"), or when ``max_active`` unfinished jobs (or
        ``max_active_per_key`` of this key's) exist. The checks and the writes happen in one
        transaction: the session, its latest job and the key are WATCHed and the caps are
        checked by the script that writes, so concurrent requests cannot all pass a check.
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
            if len(current.turns) >= max_turns:
                raise Refused("too_many_turns", f"the session has {len(current.turns)} turns, the most allowed "
                                                "(LMD_MAX_TURNS); start a new session")
            if guard is not None:
                job_keys = [self.job_key(t.job_id) for t in current.turns]
                if job_keys:
                    pipe.watch(*job_keys)  # a turn finishing (or starting) meanwhile retries the check
                guard(current, self.get_jobs_via(pipe, [t.job_id for t in current.turns]))
            turn = len(current.turns) + 1
            created = job.model_copy(update={"turn": turn, "idempotency_claim": idempotency[0] if idempotency else None})
            updated = current.model_copy(
                update={
                    "turns": [*current.turns, SessionTurn(turn=turn, kind=job.kind, text=job.prompt, job_id=job.job_id)],
                    "updated_at": utcnow(),
                }
            )
            keys = [self.job_key(job.job_id), skey, self.active_key, self.owner_active_key(job.owner)]
            args = [created.model_dump_json(), updated.model_dump_json(), self.retention_s, max_active,
                    max_active_per_key, job.job_id]
            if idempotency:
                keys.append(idempotency[0])
                args.append(idempotency[1].model_copy(update={"turn": turn}).model_dump_json())
            pipe.multi()
            self._create(keys=keys, args=args, client=pipe)
            for earlier in current.turns:  # a session's turns expire together
                pipe.expire(self.job_key(earlier.job_id), self.retention_s)
            # The key's list of sessions (GET /sessions); a refused job is listed too, harmlessly:
            # the listing drops ids whose record is gone.
            index = self.owner_sessions_key(job.owner)
            pipe.zadd(index, {session.session_id: updated.updated_at.timestamp()})
            pipe.expire(index, self.retention_s)
            return created, None

        outcome, admitted = self._transaction(attempt, *watches, with_results=True)
        if outcome[1] is None and admitted is not None and admitted[0] != "ok":
            if admitted[0] == "full":
                raise Refused("too_many_active_jobs", f"{max_active} jobs are already queued or running "
                                                      "(LMD_MAX_ACTIVE_JOBS); retry later")
            raise Refused("too_many_active_jobs", f"this API key has {max_active_per_key} jobs queued or running "
                                                  "(LMD_MAX_ACTIVE_JOBS_PER_KEY); retry once some have finished")
        return outcome

    def get_jobs_via(self, pipe: redis.client.Pipeline, job_ids: list[str]) -> dict[str, JobRecord]:
        """``get_jobs`` through a pipeline in WATCH mode (commands run at once)."""
        if not job_ids:
            return {}
        raws = pipe.mget([self.job_key(j) for j in job_ids])
        return {j: JobRecord.model_validate_json(r) for j, r in zip(job_ids, raws) if r}

    def hit_rate(self, owner: str | None, per_minute: int) -> int | None:
        """Count one request of ``owner``; the seconds to wait when it already made ``per_minute``
        in the last 60 s.

        A moving window (the ``limits`` library's, one Lua script in Redis, shared by every API
        process): no two full bursts around a clock minute's edge, as a fixed window allows.
        A refused request is not counted.
        """
        item = RateLimitItemPerMinute(per_minute)
        who = owner or "-"
        if self._rate.hit(item, who):
            return None
        reset_at, _remaining = self._rate.get_window_stats(item, who)
        return max(1, math.ceil(reset_at - time.time()))

    # --- event streams ---------------------------------------------------------------------------
    def open_stream(self, owner: str | None, stream_id: str, max_streams: int, lease_s: float) -> bool:
        """Count a new event stream of ``owner``; False when it already has ``max_streams`` open.

        Each stream holds a lease it renews while open (:meth:`renew_stream`), so the streams of an
        API process that died stop counting after ``lease_s``.
        """
        return bool(self._open_stream(keys=[self.streams_key(owner)], args=[time.time(), stream_id, max_streams, lease_s]))

    def renew_stream(self, owner: str | None, stream_id: str, lease_s: float) -> None:
        self.redis.zadd(self.streams_key(owner), {stream_id: time.time() + lease_s}, xx=True)

    def close_stream(self, owner: str | None, stream_id: str) -> None:
        self.redis.zrem(self.streams_key(owner), stream_id)

    # --- persistence -----------------------------------------------------------------------------
    def persistence(self) -> str:
        """How Redis keeps its data over a restart: ``aof`` (append-only file), ``rdb`` (snapshots
        only: the writes since the last one are lost), ``none``, or ``unknown`` (CONFIG refused,
        as on some managed services)."""
        if int(self.redis.info("persistence").get("aof_enabled", 0)):
            return "aof"
        try:
            save = self.redis.config_get("save").get("save", "")
        except redis.ResponseError:
            return "unknown"
        return "rdb" if save.strip() else "none"

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
            ttl = self.ended_retention_s if new.state in ("failed", "canceled") else self.retention_s
            session_ttl = self._session_ttl(pipe, new, ttl) if ttl < self.retention_s else None
            pipe.multi()
            pipe.set(key, new.model_dump_json(), ex=ttl)
            if session_ttl is not None:  # the session and the claim go when their last job goes
                pipe.expire(self.session_key(new.session_id), session_ttl)
            if new.idempotency_claim and ttl < self.retention_s:
                pipe.expire(new.idempotency_claim, ttl)
            if new.terminal:
                pipe.srem(self.active_key, job_id)
                pipe.srem(self.owner_active_key(new.owner), job_id)
                pipe.delete(self.cancel_key(job_id))
            for counter in transitions.counters(job, new):
                pipe.hincrby(self.stats_key, counter, 1)
            return new

        return self._transaction(attempt, key)

    def _session_ttl(self, pipe: redis.client.Pipeline, job: JobRecord, ttl: int) -> int | None:
        """The seconds the session of ``job`` (which is now kept ``ttl``) should live: as long as the
        longest-kept of its jobs. Read under WATCH of the session, so a turn added meanwhile
        (which refreshes every job of the session) retries the change. None: leave it as is."""
        skey = self.session_key(job.session_id)
        pipe.watch(skey)
        raw = pipe.get(skey)
        if raw is None:
            return None
        others = [t.job_id for t in SessionRecord.model_validate_json(raw).turns if t.job_id != job.job_id]
        remaining = [pipe.ttl(self.job_key(j)) for j in others]
        return max([ttl, *(r for r in remaining if r is not None and r > 0)])

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
        """(text, layout) of the session's succeeded turns before ``before_turn``: what a revision sees.

        A turn that rendered a layout the client gave (edited by hand in the studio, or sent
        with POST /generate) is no instruction: its layout replaces the answer of the turn
        before it, so the LLM revises what the user rendered, and its text (the prompt again)
        is not sent as an instruction. A session that starts with a given layout starts with it.
        """
        session = self.get_session(session_id)
        if session is None:
            return []
        earlier = [t for t in session.turns if t.turn < before_turn]
        jobs = self.get_jobs([t.job_id for t in earlier])
        turns: list[tuple[str, Layout]] = []
        for t in earlier:
            job = jobs.get(t.job_id)
            if job is None or job.state != "succeeded" or job.layout is None:
                continue
            if job.layout_given and turns:
                turns[-1] = (turns[-1][0], job.layout)
            else:
                turns.append((t.text, job.layout))
        return turns

    def owner_sessions(self, owner: str | None, offset: int, limit: int) -> tuple[list[SessionRecord], int]:
        """A page of ``owner``'s sessions, latest turn first, and how many there are.

        Ids whose record expired (or was never written) leave the index as they are met; entries
        older than the retention are dropped first, so ``total`` counts live sessions (give or
        take one expiring meanwhile).
        """
        index = self.owner_sessions_key(owner)
        self.redis.zremrangebyscore(index, "-inf", time.time() - self.retention_s)
        while True:
            ids = self.redis.zrevrange(index, offset, offset + limit - 1)
            raws = self.redis.mget([self.session_key(s) for s in ids]) if ids else []
            gone = [s for s, raw in zip(ids, raws) if raw is None]
            if not gone:
                break
            self.redis.zrem(index, *gone)  # then read the page again: later ones moved up
        sessions = [SessionRecord.model_validate_json(raw) for raw in raws]
        return [s for s in sessions if s.owner == owner], int(self.redis.zcard(index))

    # --- workers and the reaper -----------------------------------------------------------------
    def register_worker(self, name: str, queues: list[str], ttl_s: float, capabilities: dict | None = None) -> None:
        """Say this worker is alive (for ``ttl_s``), which queues it serves and, for a render worker,
        what it can run (``lmd.capabilities``)."""
        payload = json.dumps({"name": name, "queues": queues, "pid": os.getpid(), "seen_at": time.time(),
                              "capabilities": capabilities})
        with self.redis.pipeline() as pipe:
            pipe.set(self.worker_key(name), payload, px=max(1000, int(ttl_s * 1000)))
            pipe.sadd(self.workers_key, name)
            pipe.execute()

    def unregister_worker(self, name: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.worker_key(name))
            pipe.srem(self.workers_key, name)
            pipe.execute()

    def workers(self) -> list[dict]:
        """Live workers, by name; names whose heartbeat key expired leave the set here."""
        names = sorted(self.redis.smembers(self.workers_key))
        raws = self.redis.mget([self.worker_key(n) for n in names]) if names else []
        gone = [n for n, raw in zip(names, raws) if raw is None]
        if gone:
            self.redis.srem(self.workers_key, *gone)
        return [json.loads(r) for r in raws if r]

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

    def _transaction(self, attempt: Callable, *keys: str, with_results: bool = False):
        """Run ``attempt`` under WATCH until its MULTI/EXEC goes through (bounded).

        ``with_results``: return ``(outcome, results of the EXEC)`` (None when nothing was queued).
        """
        for _ in range(_CONFLICT_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    outcome = attempt(pipe)
                    results = pipe.execute() if pipe.explicit_transaction else None
                    return (outcome, results) if with_results else outcome
                except redis.WatchError:
                    continue
        raise StoreConflict(f"records {list(keys)} changed {_CONFLICT_ATTEMPTS} times while being updated")
