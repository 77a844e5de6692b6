"""POST /generate: a prompt (or a layout) becomes a queued job in a session."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.exceptions import RequestValidationError

from api.deps import CeleryDep, OwnerDep, SettingsDep, StoreDep, owned_session
from api.schemas import Accepted, GenerateRequest, limit_errors
from jobs.records import JobRecord, SessionRecord, new_id, utcnow
from api.submit import replay, submit

router = APIRouter(tags=["generate"])


@router.post("/generate", status_code=202, response_model=Accepted)
def generate(
    body: GenerateRequest,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Accepted:
    """Queue a generation: plan the prompt with the LLM (skipped when ``layout`` is given), then render.

    A retry with the same ``Idempotency-Key`` and body returns the same job; the same key
    with another body is a 409.
    """
    errors = limit_errors(body, settings)
    if errors:
        raise RequestValidationError(errors)
    payload = body.model_dump(mode="json")
    if (earlier := replay(store, owner, "generate", payload, idempotency_key)) is not None:
        return earlier
    now = utcnow()
    if body.session_id is not None:
        session = owned_session(body.session_id, store, owner)
    else:
        seed = body.seed if body.seed is not None else secrets.randbelow(settings.max_seed + 1)
        session = SessionRecord(session_id=new_id(), owner=owner, seed=seed, created_at=now, updated_at=now)
    text = (body.prompt or "").strip() or "; ".join(body.layout.phrases())
    job = JobRecord(
        job_id=new_id(),
        session_id=session.session_id,
        owner=owner,
        kind="generate",
        prompt=text,
        layout=body.layout,
        layout_given=body.layout is not None,
        seed=body.seed if body.seed is not None else session.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        width=body.width,
        height=body.height,
        negative_prompt=body.negative_prompt,
        variant=body.variant or settings.variant,
        preset=body.preset or settings.preset,
        conditioning=body.conditioning or settings.conditioning,
        language=body.language,
        source_prompt=(body.prompt or "").strip() or None,
        created_at=now,
        updated_at=now,
    )
    return submit(store, celery, job, session, "generate", payload, idempotency_key, settings)
