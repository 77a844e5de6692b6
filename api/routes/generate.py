"""POST /generate and POST /plan: a prompt (or a layout) becomes a queued job in a session."""

from __future__ import annotations

import logging
import secrets

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError

from api.deps import SubmissionDep, owned_session
from api.schemas import Accepted, GenerateRequest, PlanRequest, limit_errors
from api.submit import Submission, chosen_loras, chosen_model
from grounded_sd.errors import ConditioningUnavailable, LanguageUnavailable, ModelLoadError, SourcePromptMissing, VariantUnavailable
from lmd.wiring import check_render
from jobs.records import JobKind, JobRecord, SessionRecord, new_id, utcnow

router = APIRouter(tags=["generate"])
log = logging.getLogger(__name__)


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
    model = chosen_model(settings, body.model)
    loras = chosen_loras(settings, body.loras)
    errors = limit_errors(body, settings) or render_errors(body, settings, model)  # a plan's settings render later
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
        model=model,
        loras=loras,
        created_at=now,
        updated_at=now,
    )
    return submission.submit(job, session, kind, payload)


def render_errors(body: GenerateRequest | PlanRequest, settings, model: str | None = None) -> list[dict]:
    """A render this server cannot run, refused when the job is accepted (before planning spends an
    LLM call): the conditioning's files, GlueNet's checkpoint for the prompt's language, lmd_plus
    without a GLIGEN UNet (read from its config only when at hand: a directory or the hub cache).
    The client is told what to change; the paths and settings at fault go to the log only."""
    conditioning = body.conditioning or settings.conditioning
    variant = body.variant or settings.variant
    checked = "clip" if conditioning.startswith("connector:") else conditioning  # an export is read with torch: the worker checks it
    try:
        check_render(settings, variant=variant, conditioning=checked, prompt=(body.prompt or "").strip() or None,
                     language=body.language, model=model, download=False)
    except LanguageUnavailable as exc:
        return [_refusal("conditioning", conditioning,
                         f"conditioning gluenet has no checkpoint on this server for the prompt's language {exc.language!r} "
                         f"(it has: {', '.join(exc.configured)}); set language if it was detected wrongly")]
    except SourcePromptMissing:
        return [_refusal("conditioning", conditioning, "conditioning gluenet denoises with the prompt in its own "
                         "language: send prompt with the layout (the conditioning needs it on this server)")]
    except ConditioningUnavailable as exc:
        log.warning("refused conditioning %s: %s", conditioning, exc)
        return [_refusal("conditioning", conditioning,
                         f"conditioning {conditioning} is not available on this server (its files are not installed)")]
    except VariantUnavailable:
        return [_refusal("variant", variant, "variant lmd_plus needs a GLIGEN model; the model on this server has none")]
    except ModelLoadError as exc:  # the config could not be read here: the render worker decides
        log.warning("could not check variant %s before queuing: %s", variant, exc)
    return []


def _refusal(field: str, value: str, message: str) -> dict:
    return {"loc": ("body", field), "type": "value_error", "input": value, "msg": message}
