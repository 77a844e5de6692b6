"""Sessions: the turns of a multi-turn edit (docs/method.md, multi-turn revision), and POST /sessions/{id}/instruct."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException
from fastapi.exceptions import RequestValidationError

from api.deps import CeleryDep, OwnerDep, SessionDep, SettingsDep, StoreDep
from api.schemas import Accepted, InstructRequest, SessionView, limit_errors
from jobs.records import JobRecord, new_id, utcnow
from api.submit import replay, submit

router = APIRouter(prefix="/sessions", tags=["sessions"])


@router.get("/{session_id}", response_model=SessionView)
def get_session(session: SessionDep, store: StoreDep) -> SessionView:
    """Every turn: its kind, text, job, the job's state and its layout once planned."""
    jobs = store.get_jobs([t.job_id for t in session.turns])
    return SessionView.of(session, jobs)


@router.post("/{session_id}/instruct", status_code=202, response_model=Accepted)
def instruct(
    body: InstructRequest,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Accepted:
    """Revise the session's latest layout with ``instruction`` and render it with the session's seed.

    The latest turn must have finished (409 otherwise), and at least one turn must have
    succeeded: the revision starts from the conversation of succeeded turns.
    """
    errors = limit_errors(body, settings)
    if errors:
        raise RequestValidationError(errors)
    payload = {"session_id": session.session_id, **body.model_dump(mode="json")}
    if (earlier := replay(store, owner, "instruct", payload, idempotency_key)) is not None:
        return earlier
    jobs = store.get_jobs([t.job_id for t in session.turns])
    if session.turns:
        latest = jobs.get(session.turns[-1].job_id)
        if latest is not None and not latest.terminal:
            raise HTTPException(409, f"turn {session.turns[-1].turn} is still {latest.state}; "
                                     "instruct once it has finished (or cancel it)")
    if not any(j.state == "succeeded" and j.layout is not None for j in jobs.values()):
        raise HTTPException(409, "the session has no succeeded turn whose layout could be revised; "
                                 "POST /generate with this session_id first")
    now = utcnow()
    job = JobRecord(
        job_id=new_id(),
        session_id=session.session_id,
        owner=owner,
        kind="instruct",
        prompt=body.instruction.strip(),
        seed=body.seed if body.seed is not None else session.seed,
        previews=body.previews,
        **_render_settings_of_latest(session, jobs),
        created_at=now,
        updated_at=now,
    )
    return submit(store, celery, job, session, "instruct", payload, idempotency_key, settings)


def _render_settings_of_latest(session, jobs: dict[str, JobRecord]) -> dict:
    """An edit renders like the turn it edits: same size, steps, guidance, variant, preset, negative prompt,
    conditioning (and the prompt and language GlueNet reads: the session's first words)."""
    for t in reversed(session.turns):
        job = jobs.get(t.job_id)
        if job is not None and job.state == "succeeded":
            return {k: getattr(job, k) for k in ("steps", "guidance_scale", "width", "height", "negative_prompt",
                                                   "variant", "preset", "conditioning", "language", "source_prompt")}
    return {}
