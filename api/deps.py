"""Injected dependencies: the settings, the record store, the Celery app, the caller's key, a submission."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, HTTPException, Request

from api.submit import Submission

from jobs.records import JobRecord, SessionRecord
from jobs.store import Store
from lmd.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def owner_of(key: str) -> str:
    """Records keep a digest of the key that created them, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _sent_key(request: Request) -> str | None:
    """The key in ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``."""
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key or None


def _known(key: str, keys: list[str]) -> bool:
    return any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_owner(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str | None:
    """The caller's identity: None when API keys are off; 401 when they are on and the key is wrong.

    The key comes in ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
    """
    if not settings.api_keys:
        return None
    key = _sent_key(request)
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", _CHALLENGE)
    if not _known(key, settings.api_keys):
        raise HTTPException(401, "invalid API key", _CHALLENGE)
    return owner_of(key)


def is_operator(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> bool:
    """Whether the caller may see operator details (/metrics, the workers in /readyz).

    With ``LMD_OPS_KEYS`` set, only those keys may; otherwise any ``LMD_API_KEYS`` key; with no
    keys configured at all the service is open (to everyone who can reach it) and so are these.
    """
    keys = settings.ops_keys or settings.api_keys
    if not keys:
        return True
    key = _sent_key(request)
    return key is not None and _known(key, keys)


def require_operator(operator: Annotated[bool, Depends(is_operator)]) -> None:
    """401 unless :func:`is_operator`."""
    if not operator:
        raise HTTPException(401, "this endpoint needs an operator key (LMD_OPS_KEYS, or any LMD_API_KEYS key "
                                 "when LMD_OPS_KEYS is empty)", _CHALLENGE)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
OperatorDep = Annotated[bool, Depends(is_operator)]


def get_submission(
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Submission:
    return Submission(settings, store, celery, owner, idempotency_key)


SubmissionDep = Annotated[Submission, Depends(get_submission)]


def _shown(record_id: str) -> str:
    """An id as a 404 quotes it: printable and short, whatever the client sent."""
    return ascii(record_id[:64]) + ("..." if len(record_id) > 64 else "")


def owned_job(job_id: str, store: StoreDep, owner: OwnerDep) -> JobRecord:
    """The job, or 404 when it does not exist, expired, or belongs to another key."""
    job = store.get_job(job_id) if len(job_id) <= 64 else None
    if job is None or job.owner != owner:
        raise HTTPException(404, f"job {_shown(job_id)} not found (unknown, expired, or not yours)")
    return job


def owned_session(session_id: str, store: StoreDep, owner: OwnerDep) -> SessionRecord:
    session = store.get_session(session_id) if len(session_id) <= 64 else None
    if session is None or session.owner != owner:
        raise HTTPException(404, f"session {_shown(session_id)} not found (unknown, expired, or not yours)")
    return session


JobDep = Annotated[JobRecord, Depends(owned_job)]
SessionDep = Annotated[SessionRecord, Depends(owned_session)]
