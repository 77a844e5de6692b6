"""Submitting a job: the idempotency claim, the records, then the Celery message.

Shared by POST /generate, POST /plan and POST /sessions/{id}/instruct through one injected
:class:`Submission` (what those routes need: settings, store, Celery, caller, Idempotency-Key). The job, its session turn and
the Idempotency-Key claim are written in one Redis transaction, so a retried request finds
either everything or nothing. The message is sent after the records exist, so a worker
never receives a job it cannot read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from kombu.exceptions import OperationalError

from api.errors import ApiError
from api.schemas import Accepted, LoraRequest
from jobs.queue import enqueue
from jobs.records import IdempotencyRecord, JobRecord, SessionRecord, body_hash
from jobs.store import Refused, Store
from grounded_sd.lora import LoraUse
from lmd import wiring
from lmd.settings import Settings

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_CHARS = 200


Guard = Callable[[SessionRecord, dict[str, JobRecord]], None]


@dataclass(frozen=True)
class Submission:
    """One queuing request's context, injected into the routes that create jobs."""

    settings: Settings
    store: Store
    celery: Celery
    owner: str | None
    idempotency_key: str | None

    def replay(self, route: str, payload: dict) -> Accepted | None:
        """:func:`replay` for this request."""
        return replay(self.store, self.owner, route, payload, self.idempotency_key)

    def submit(self, job: JobRecord, session: SessionRecord, route: str, payload: dict, guard: Guard | None = None) -> Accepted:
        """:func:`submit` for this request."""
        return submit(self.store, self.celery, job, session, route, payload, self.idempotency_key, self.settings, guard)


class IdempotencyConflict(ApiError):
    def __init__(self) -> None:
        super().__init__(409, "idempotency_conflict", "Idempotency-Key was already used with a different request body; use a new key")


def replay(store: Store, owner: str | None, route: str, payload: dict, idempotency_key: str | None) -> Accepted | None:
    """The earlier answer for a reused Idempotency-Key (409 when the body differs); None for a new key.

    Routes call this before their own state checks, so a retry of a request that was accepted
    gets the same 202 even though the job it created now makes the check fail (an instruct
    retried while its own turn is still rendering).
    """
    if idempotency_key is None:
        return None
    _check_key(idempotency_key)
    earlier = store.get_idempotency(store.idempotency_key(owner, route, idempotency_key))
    if earlier is None:
        return None
    if earlier.body_hash != body_hash({"route": route, **payload}):
        raise IdempotencyConflict()
    return Accepted(job_id=earlier.job_id, session_id=earlier.session_id, turn=earlier.turn,
                    status_url=f"/jobs/{earlier.job_id}")


def _check_key(idempotency_key: str) -> None:
    """A 422 in the same shape as the body's, located at the header."""
    if not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise RequestValidationError([{
            "loc": ("header", "idempotency-key"), "type": "value_error", "input": idempotency_key,
            "msg": f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} characters; got {len(idempotency_key)}",
        }])


def submit(
    store: Store,
    celery: Celery,
    job: JobRecord,
    session: SessionRecord,
    route: str,
    payload: dict,
    idempotency_key: str | None,
    settings: Settings,
    guard: Guard | None = None,
) -> Accepted:
    """Store ``job`` as the next turn of ``session`` and enqueue it; replay an earlier answer for a reused key.

    The per-key request rate is counted first; the caps (active jobs, per key, turns) and
    ``guard`` are checked by the store in the transaction that writes the job.
    """
    claim = None
    if idempotency_key is not None:
        _check_key(idempotency_key)
        record = IdempotencyRecord(body_hash=body_hash({"route": route, **payload}), job_id=job.job_id,
                                   session_id=session.session_id, turn=0)
        claim = (store.idempotency_key(job.owner, route, idempotency_key), record)

    wait_s = store.hit_rate(job.owner, settings.rate_limit_per_min)
    if wait_s is not None:
        raise ApiError(429, "rate_limited", f"more than {settings.rate_limit_per_min} jobs a minute from this key "
                       "(LMD_RATE_LIMIT_PER_MIN); retry later", {"Retry-After": str(wait_s)})
    try:
        created, earlier = store.create_job(job, session, claim, max_active=settings.max_active_jobs,
                                            max_active_per_key=settings.max_active_jobs_per_key,
                                            max_turns=settings.max_turns, guard=guard)
    except Refused as exc:
        if exc.code == "too_many_active_jobs":
            raise ApiError(429, exc.code, str(exc), {"Retry-After": str(settings.retry_after_s)}) from None
        raise ApiError(409, exc.code, str(exc)) from None
    if earlier is not None:
        if earlier.body_hash != claim[1].body_hash:
            raise IdempotencyConflict()
        return Accepted(job_id=earlier.job_id, session_id=earlier.session_id, turn=earlier.turn,
                        status_url=f"/jobs/{earlier.job_id}")

    try:
        enqueue(celery, created.job_id, "render" if created.layout_given else "plan", model=created.model)
    # kombu's Redis channel can fail its publish retry with an AttributeError after Redis refused
    # the first attempt (seen once in the suite with maxmemory reached): the same failure.
    except (OperationalError, AttributeError) as exc:
        log.warning("could not enqueue job %s: %r", created.job_id, exc)
        try:
            store.mark_enqueue_failed(created.job_id)
            if claim is not None:
                store.forget_idempotency(claim[0])
        except redis.RedisError as again:
            log.warning("could not mark job %s enqueue_failed: %s", created.job_id, again)
        retry = {"Retry-After": str(settings.retry_after_s)}
        if _refused_for_memory(exc):
            raise ApiError(507, "store_full", "the service's store is full; retry later", retry) from exc
        raise HTTPException(503, "the job queue is unreachable; retry shortly", retry) from exc
    return Accepted(job_id=created.job_id, session_id=created.session_id, turn=created.turn,
                    status_url=f"/jobs/{created.job_id}")


def _refused_for_memory(exc: BaseException | None) -> bool:
    """Whether Redis's maxmemory refusal is ``exc`` or what it was raised from or during."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def chosen_model(settings, name: str | None) -> str | None:
    """The LMD_MODELS name the job renders with; an unknown name is a 422 ``unknown_model``."""
    try:
        return wiring.request_model(settings, name)
    except wiring.UnknownName as exc:
        raise ApiError(422, "unknown_model", str(exc)) from None


def chosen_loras(settings, loras: list[LoraRequest]) -> list[LoraUse]:
    """The request's adapters, each a name of LMD_LORAS; an unknown (or repeated) name is a 422 ``unknown_lora``."""
    try:
        return [c.use() for c in wiring.lora_choices(settings, [(lora.name, lora.weight) for lora in loras])]
    except wiring.UnknownName as exc:
        raise ApiError(422, "unknown_lora", str(exc)) from None
