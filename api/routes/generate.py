"""POST /generate and POST /plan: a prompt (or a layout) becomes a queued job in a session."""

from __future__ import annotations

import secrets

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError

from api.deps import SubmissionDep, owned_session
from api.schemas import Accepted, GenerateRequest, PlanRequest, limit_errors
from api.submit import Submission
from jobs.records import JobKind, JobRecord, SessionRecord, new_id, utcnow

router = APIRouter(tags=["generate"])


@router.post("/generate", status_code=202, response_model=Accepted, operation_id="generate")
def generate(body: GenerateRequest, submission: SubmissionDep) -> Accepted:
    """Queue a generation: plan the prompt with the LLM (skipped when ``layout`` is given), then render.

    With ``layout`` and ``session_id`` this renders an (edited) layout as the session's next
    turn. A retry with the same ``Idempotency-Key`` and body returns the same job; the same key
    with another body is a 409.
    """
    return _queue("generate", body, submission)


@router.post("/plan", status_code=202, response_model=Accepted, operation_id="plan")
def plan(body: PlanRequest, submission: SubmissionDep) -> Accepted:
    """Queue stage 1 alone: the job (kind ``plan``) ends ``succeeded`` with its ``layout`` and no image.

    It is a turn of its session like any other, so the layout can be edited and rendered with
    POST /generate (``layout`` + ``session_id``), or revised with POST /sessions/{id}/instruct.
    """
    return _queue("plan", body, submission)


def _queue(kind: JobKind, body: GenerateRequest | PlanRequest, submission: Submission) -> Accepted:
    settings, store, owner = submission.settings, submission.store, submission.owner
    errors = limit_errors(body, settings)
    if errors:
        raise RequestValidationError(errors)
    payload = body.model_dump(mode="json")
    if (earlier := submission.replay(kind, payload)) is not None:
        return earlier
    now = utcnow()
    if body.session_id is not None:
        session = owned_session(body.session_id, store, owner)
    else:
        seed = body.seed if body.seed is not None else secrets.randbelow(settings.max_seed + 1)
        session = SessionRecord(session_id=new_id(), owner=owner, seed=seed, created_at=now, updated_at=now)
    # A given layout's phrases stand in for the prompt; cut to the prompt limit so that an
    # instruct on this session never fails the planner's check of its first turn.
    layout = getattr(body, "layout", None)
    text = (body.prompt or "").strip() or "; ".join(layout.phrases())[: settings.max_prompt_chars].strip()
    if not text and layout is not None:  # an empty layout without a prompt: its background names it
        text = (layout.background or "an empty scene")[: settings.max_prompt_chars].strip()
    job = JobRecord(
        job_id=new_id(),
        session_id=session.session_id,
        owner=owner,
        kind=kind,
        prompt=text,
        layout=layout,
        layout_given=layout is not None,
        seed=body.seed if body.seed is not None else session.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        width=body.width,
        height=body.height,
        negative_prompt=body.negative_prompt,
        variant=body.variant or settings.variant,
        preset=body.preset or settings.preset,
        refine=body.refine,
        conditioning=body.conditioning or settings.conditioning,
        language=body.language,
        source_prompt=(body.prompt or "").strip() or None,
        previews=getattr(body, "previews", False),
        created_at=now,
        updated_at=now,
    )
    return submission.submit(job, session, kind, payload)
