"""Sessions: the turns of a multi-turn edit (docs/method.md, multi-turn revision), and POST /sessions/{id}/instruct."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError

from api.deps import OwnerDep, SessionDep, StoreDep, SubmissionDep
from api.errors import ApiError
from api.schemas import Accepted, InstructRequest, SessionList, SessionSummary, SessionView, limit_errors
from api.submit import chosen_loras
from jobs.records import JobRecord, SessionRecord, new_id, utcnow

router = APIRouter(prefix="/sessions", tags=["sessions"])


MAX_SESSIONS_PAGE = 100


@router.get("", response_model=SessionList, operation_id="list_sessions")
def list_sessions(
    store: StoreDep,
    owner: OwnerDep,
    offset: Annotated[int, Query(ge=0, le=10_000, description="first session to list, counted from 0 (latest first)")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_SESSIONS_PAGE, description="most sessions to list")] = 20,
) -> SessionList:
    """The caller's sessions (this API key's only; all sessions when keys are off), the one with the
    latest turn first: each with its first prompt, its latest turn and a thumbnail (the image of its
    latest render). Sessions made by any client are listed (the studio, curl); they leave the list
    when they expire (LMD_RETENTION_S)."""
    sessions, total = store.owner_sessions(owner, offset, limit)
    jobs = store.get_jobs([t.job_id for s in sessions for t in s.turns])
    more = offset + limit < total
    return SessionList(sessions=[SessionSummary.of(s, jobs) for s in sessions], total=total,
                       next_offset=offset + limit if more else None)


@router.get("/{session_id}", response_model=SessionView, operation_id="get_session")
def get_session(
    session: SessionDep,
    store: StoreDep,
    offset: Annotated[int, Query(ge=0, description="first turn to list, counted from 0")] = 0,
    limit: Annotated[int, Query(ge=1, le=100, description="most turns to list")] = 50,
) -> SessionView:
    """The session's turns ``offset .. offset+limit``: kind, text, job, the job's state and its layout
    once planned; ``total_turns`` and ``next_offset`` (null on the last page) page through the rest."""
    page = session.turns[offset: offset + limit]
    jobs = store.get_jobs([t.job_id for t in page])
    return SessionView.of(session, jobs, offset, limit)


@router.post("/{session_id}/instruct", status_code=202, response_model=Accepted, operation_id="instruct")
def instruct(
    body: InstructRequest,
    session: SessionDep,
    submission: SubmissionDep,
) -> Accepted:
    """Revise the session's latest layout with ``instruction`` and render it with the session's seed.

    The latest turn must have finished (409 otherwise), and at least one turn must have
    succeeded: the revision starts from the conversation of succeeded turns.
    """
    loras = chosen_loras(submission.settings, body.loras) if body.loras is not None else None
    errors = limit_errors(body, submission.settings)
    if errors:
        raise RequestValidationError(errors)
    payload = {"session_id": session.session_id, **body.model_dump(mode="json")}
    if (earlier := submission.replay("instruct", payload)) is not None:
        return earlier
    jobs = submission.store.get_jobs([t.job_id for t in session.turns])
    revisable(session, jobs)  # answers the common case early; checked again atomically when the turn is added
    now = utcnow()
    rendered = _render_settings_of_latest(session, jobs)
    if loras is not None:
        rendered["loras"] = loras
    job = JobRecord(
        job_id=new_id(),
        session_id=session.session_id,
        owner=submission.owner,
        kind="instruct",
        prompt=body.instruction.strip(),
        seed=body.seed if body.seed is not None else session.seed,
        previews=body.previews,
        **rendered,
        created_at=now,
        updated_at=now,
    )
    return submission.submit(job, session, "instruct", payload, guard=revisable)


def revisable(session: SessionRecord, jobs: dict[str, JobRecord]) -> None:
    """409 unless the latest turn has finished and some turn succeeded with a layout.

    ``jobs.store.Store.create_job`` runs this inside the transaction that appends the turn, so
    concurrent instructs on one finished session cannot all pass it: one gets 202, the others 409.
    """
    if session.turns:
        latest = jobs.get(session.turns[-1].job_id)
        if latest is not None and not latest.terminal:
            raise ApiError(409, "not_finished", f"turn {session.turns[-1].turn} is still {latest.state}; "
                                                "instruct once it has finished (or cancel it)")
    if not any(j.state == "succeeded" and j.layout is not None for j in jobs.values()):
        raise ApiError(409, "conflict", "the session has no succeeded turn whose layout could be revised; "
                                        "POST /generate with this session_id first")


def _render_settings_of_latest(session, jobs: dict[str, JobRecord]) -> dict:
    """An edit renders like the turn it edits: same size, steps, guidance, variant, preset, negative prompt,
    conditioning (and the prompt and language GlueNet reads: the session's first words), model and LoRAs."""
    for t in reversed(session.turns):
        job = jobs.get(t.job_id)
        if job is not None and job.state == "succeeded":
            return {k: getattr(job, k) for k in ("steps", "guidance_scale", "width", "height", "negative_prompt",
                                                   "variant", "preset", "conditioning", "language", "source_prompt", "refine",
                                                   "model", "loras")}
    return {}
