"""Request and response models of the HTTP API (docs/service.md "HTTP contract").

Static rules (types, unknown fields) live on the models; the limits that are settings
(``LMD_MAX_STEPS``...) are checked by :func:`limit_errors`, which names the field and the
setting in each message so a 422 says what to change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from grounded_sd.lora import LoraUse
from grounded_sd.names import ConditioningName, Preset, Variant
from jobs.records import JobError, JobKind, JobRecord, JobState, Progress, SessionRecord
from layout_planner.errors import InvalidPrompt
from layout_planner.layout import Layout
from layout_planner.text import bad_character, validate_text
from lmd.capabilities import RenderCapabilities
from lmd.settings import Settings



class LoraRequest(BaseModel):
    """One LoRA adapter for a render: a name the operator listed (LMD_LORAS) and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, description="a name of GET /limits' loras")
    weight: float = Field(1.0, ge=-10.0, le=10.0, description="1: as trained; 0: off; negative: inverted")


MAX_LORAS = 8


def once_each(loras: list[LoraRequest] | None) -> list[LoraRequest] | None:
    """A request names each adapter at most once (two weights for one adapter mean nothing)."""
    names = [lora.name for lora in loras or []]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"LoRA {twice[0]!r} is named twice; name each adapter once")
    return loras


class _RenderSettings(BaseModel):
    """What POST /plan and POST /generate share: the session and how its image is (or will be) rendered."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, description="0..LMD_MAX_SEED; unset: the session's seed (a new session draws one)")
    steps: int | None = Field(None, description="denoising steps; unset: the reference 50")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description="classifier-free guidance; unset: 7.5")
    width: int = Field(512, description="pixels, a multiple of 8 in LMD_MIN_SIZE..LMD_MAX_SIZE")
    height: int = Field(512, description="pixels, a multiple of 8 in LMD_MIN_SIZE..LMD_MAX_SIZE")
    negative_prompt: str | None = Field(None, max_length=1000, description="added to the layout's negative prompt")
    session_id: str | None = Field(None, description="add this job to an existing session (unset: a new session)")
    variant: Variant | None = Field(None, description="lmd, lmd_plus (GLIGEN model needed), sd (plain baseline); unset: LMD_VARIANT")
    preset: Preset | None = Field(None, description="stage 2 options: reference (docs/method.md) or fast; unset: LMD_PRESET")
    conditioning: ConditioningName | None = Field(
        None, description="what the denoising is conditioned on: clip, ella, gluenet (docs/conditioning.md); unset: LMD_CONDITIONING"
    )
    language: str | None = Field(None, description="ISO 639-1 code of the prompt (gluenet); unset: detected")
    refine: bool | None = Field(
        None, description="finish with the SDXL refiner (LMD_REFINER): true needs one configured (422 otherwise), false skips it; unset: refine when configured"
    )
    model: str | None = Field(None, max_length=64, description="a name of GET /limits' models (LMD_MODELS); unset: the first")
    loras: list[LoraRequest] = Field(default_factory=list, max_length=MAX_LORAS,
                                     description="LoRA adapters by name (GET /limits' loras), each with a weight")

    @field_validator("loras")
    @classmethod
    def _each_lora_once(cls, value: list[LoraRequest]) -> list[LoraRequest]:
        return once_each(value)

    @field_validator("language")
    @classmethod
    def _language_code(cls, value: str | None) -> str | None:
        from layout_planner.language import normalize_language

        return normalize_language(value) if value is not None else None


class GenerateRequest(_RenderSettings):
    prompt: str | None = Field(None, description="the scene in words; optional when layout is given")
    layout: Layout | None = Field(None, description="skip stage 1 and render this layout")
    previews: bool = Field(False, description="write a live preview every few steps (GET /jobs/{id}/preview)")


class PlanRequest(_RenderSettings):
    """Stage 1 alone: the job ends ``succeeded`` with its layout and renders nothing. The render
    settings are kept on the session's turn, so an instruct after it renders with them."""

    prompt: str = Field(description="the scene in words")


class InstructRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(description="what to change in the session's latest layout")
    loras: list[LoraRequest] | None = Field(None, max_length=MAX_LORAS,
                                            description="LoRA adapters of this turn; unset: those of the turn it edits")

    @field_validator("loras")
    @classmethod
    def _each_lora_once(cls, value: list[LoraRequest] | None) -> list[LoraRequest] | None:
        return once_each(value)
    seed: int | None = Field(None, description="unset: the session's seed, so unchanged objects stay put")
    previews: bool = Field(False, description="write a live preview every few steps (GET /jobs/{id}/preview)")


class Accepted(BaseModel):
    """The answer to POST /generate and POST /sessions/{id}/instruct (status 202)."""

    job_id: str
    session_id: str
    turn: int
    status_url: str


class JobResult(BaseModel):
    image_url: str
    overlay_url: str
    report_url: str = Field(description="report.json: per object mask source, IoU, energies; per stage times")
    masks: dict[str, str] = Field(description="object id -> URL of its mask PNG (none for the sd variant)")


class JobView(BaseModel):
    job_id: str
    session_id: str
    turn: int
    kind: JobKind
    state: JobState
    progress: Progress
    prompt: str
    layout: Layout | None
    seed: int
    steps: int | None
    guidance_scale: float | None
    width: int
    height: int
    negative_prompt: str | None
    variant: str
    preset: str
    conditioning: str
    language: str | None
    previews: bool
    refine: bool | None
    model: str | None
    loras: list[LoraUse]
    error: JobError | None
    cancel_requested: bool
    deliveries: int
    result: JobResult | None = Field(description="the files of a succeeded render (null for a plan job: its result is the layout)")
    preview_url: str | None = Field(description="the latest live preview while rendering (progress.preview says which)")
    notice: str | None = Field(None, description="why a waiting job does not move: no worker serves its queue now")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, job: JobRecord, notice: str | None = None) -> "JobView":
        base = f"/jobs/{job.job_id}"
        result = None
        if job.state == "succeeded" and job.kind != "plan":
            masks = {} if job.variant == "sd" or job.layout is None else {o.id: f"{base}/masks/{o.id}" for o in job.layout.objects}
            result = JobResult(image_url=f"{base}/image", overlay_url=f"{base}/overlay", report_url=f"{base}/report", masks=masks)
        preview_url = f"{base}/preview" if job.progress.preview is not None and not job.terminal else None
        return cls(result=result, preview_url=preview_url, notice=notice,
                   **job.model_dump(exclude={"owner", "layout_given", "worker", "heartbeat_at", "idempotency_claim"}))


class TurnView(BaseModel):
    turn: int
    kind: JobKind
    text: str
    layout: Layout | None = Field(description="the turn's planned layout; null until planned")
    job_id: str
    state: JobState | None = Field(description="the turn's job state; null once the job record expired")


class SessionView(BaseModel):
    session_id: str
    seed: int
    total_turns: int
    turns: list[TurnView] = Field(description="the page of turns asked for (offset, limit)")
    next_offset: int | None = Field(description="offset of the next page; null when this page is the last")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, session: SessionRecord, jobs: dict[str, JobRecord], offset: int = 0, limit: int = 50) -> "SessionView":
        turns = []
        page = session.turns[offset: offset + limit]
        for t in page:
            job = jobs.get(t.job_id)
            turns.append(
                TurnView(
                    turn=t.turn,
                    kind=t.kind,
                    text=t.text,
                    job_id=t.job_id,
                    layout=job.layout if job else None,
                    state=job.state if job else None,
                )
            )
        more = offset + limit < len(session.turns)
        return cls(session_id=session.session_id, seed=session.seed, total_turns=len(session.turns), turns=turns,
                   next_offset=offset + limit if more else None,
                   created_at=session.created_at, updated_at=session.updated_at)


class SessionSummary(BaseModel):
    """One session in the caller's list (GET /sessions): enough to show it and open it."""

    session_id: str
    seed: int
    total_turns: int
    prompt: str = Field(description="the first turn's text (its prompt)")
    latest: TurnView | None = Field(description="the latest turn")
    thumbnail_url: str | None = Field(description="the image of the latest succeeded render; null when none")
    created_at: datetime
    updated_at: datetime = Field(description="when its latest turn was added: the list's order")

    @classmethod
    def of(cls, session: SessionRecord, jobs: dict[str, JobRecord]) -> "SessionSummary":
        latest = session.turns[-1] if session.turns else None
        latest_job = jobs.get(latest.job_id) if latest else None
        rendered = [t for t in session.turns if (j := jobs.get(t.job_id)) and j.state == "succeeded" and j.kind != "plan"]
        return cls(
            session_id=session.session_id, seed=session.seed, total_turns=len(session.turns),
            prompt=session.turns[0].text if session.turns else "",
            latest=TurnView(turn=latest.turn, kind=latest.kind, text=latest.text, job_id=latest.job_id,
                            layout=latest_job.layout if latest_job else None,
                            state=latest_job.state if latest_job else None) if latest else None,
            thumbnail_url=f"/jobs/{rendered[-1].job_id}/image" if rendered else None,
            created_at=session.created_at, updated_at=session.updated_at,
        )


class SessionList(BaseModel):
    sessions: list[SessionSummary] = Field(description="the page asked for (offset, limit), latest turn first")
    total: int = Field(description="the caller's sessions within the retention (LMD_RETENTION_S)")
    next_offset: int | None = Field(description="offset of the next page; null when this page is the last")


class WorkerView(BaseModel):
    name: str
    queues: list[str]
    pid: int
    seen_at: float


class PlannerView(BaseModel):
    """Which layout planner the settings select (``LMD_PLANNER``) and why."""

    kind: Literal["remote", "local"]
    model: str
    endpoint: str | None = None
    reason: str


class Readiness(BaseModel):
    redis: Literal["ok"]
    persistence: Literal["aof", "rdb", "none", "unknown"] = Field(
        description="how Redis keeps the records over a restart; anything but aof loses jobs (docs/service.md)"
    )
    worker_counts: dict[str, int] = Field(description="workers that beat recently, per queue")
    workers: list[WorkerView] | None = Field(description="their names and pids; null unless the caller is an operator")
    queues_without_workers: list[str]
    planner: PlannerView | None = Field(description="the layout planner the settings select; null unless the caller is an operator")


class Limits(BaseModel):
    """What a request may ask for (GET /limits): a client can show the limits before it meets a 422."""

    max_prompt_chars: int
    max_instruction_chars: int
    max_objects: int
    max_steps: int
    min_size: int
    max_size: int
    size_multiple: int = Field(8, description="width and height must be multiples of this")
    max_seed: int
    default_size: int = 512
    default_steps: int = Field(50, description="the steps of a request that names none (the reference's)")
    presets: list[str]
    preset: str = Field(description="the preset of a request that names none (LMD_PRESET)")
    variants: list[str]
    variant: str = Field(description="the variant of a request that names none (LMD_VARIANT)")
    conditionings: list[str] = Field(description="the conditioning names a request may give")
    conditioning: str = Field(description="the conditioning of a request that names none (LMD_CONDITIONING)")
    default_guidance_scale: float = Field(7.5, description="classifier-free guidance of a request that names none")
    max_guidance_scale: float = Field(50.0, description="largest guidance_scale accepted")
    auth: bool = Field(description="true when the service wants an API key (LMD_API_KEYS is set)")
    render_workers: int | None = Field(description="render workers alive now; null when the store is unreachable")
    render: RenderCapabilities | None = Field(
        description="what every live render worker can run (a job may go to any): the model, the scheduler, the "
                    "variants, conditionings and refiner; null when no render worker runs, so no render can start"
    )
    models: list[str] = Field(default_factory=list, description="the model names a request may give (LMD_MODELS); empty: one model, name none")
    model: str | None = Field(None, description="the model of a request that names none (the first of LMD_MODELS)")
    loras: list[str] = Field(default_factory=list, description="the LoRA adapter names a request may give (LMD_LORAS)")
    render_by_model: dict[str, RenderCapabilities] = Field(
        default_factory=dict, description="per LMD_MODELS name, what its live render workers can run; a name missing here has none"
    )

    @classmethod
    def of(cls, settings: Settings, render: RenderCapabilities | None = None, render_workers: int | None = None,
           render_by_model: dict[str, RenderCapabilities] | None = None) -> "Limits":
        return cls(
            render=render, render_workers=render_workers, render_by_model=render_by_model or {},
            models=list(settings.models), model=next(iter(settings.models), None), loras=list(settings.loras),
            conditionings=list(get_args(ConditioningName)), conditioning=settings.conditioning,
            max_prompt_chars=settings.max_prompt_chars, max_instruction_chars=settings.max_instruction_chars,
            max_objects=settings.max_objects, max_steps=settings.max_steps, min_size=settings.min_size,
            max_size=settings.max_size, max_seed=settings.max_seed, presets=list(get_args(Preset)),
            preset=settings.preset, variants=list(get_args(Variant)), variant=settings.variant,
            auth=bool(settings.api_keys),
        )


_ALLOWED_CONTROLS = frozenset("\t\n\r")


def _bad_character(text: str) -> tuple[int, str] | None:
    """The first control character or lone surrogate in ``text`` (tab and newlines are fine)."""
    for i, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Cs") and ch not in _ALLOWED_CONTROLS:
            return i, ch
    return None


def text_errors(value: object, loc: tuple) -> list[dict]:
    """422 errors for every string in ``value`` (nested) that the planner's text rule refuses.

    Such text reaches the LLM, the tokenizer, logs and JSON records; a lone surrogate cannot
    even be stored as UTF-8. It is refused at the edge with the field's path, by the same
    function (``layout_planner.text.bad_character``) the planner applies later.
    """
    if isinstance(value, str):
        problem = bad_character(value)
        if problem is None:
            return []
        return [{"loc": ("body", *loc), "msg": f"{loc[-1] if loc else 'body'} contains {problem}; remove it",
                 "type": "value_error", "input": ascii(value)[:200]}]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in text_errors(v, (*loc, k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in text_errors(v, (*loc, i))]
    return []


def _error(field: str, message: str, value: object) -> dict:
    return {"loc": ("body", field), "msg": message, "type": "value_error", "input": value}


def _planner_text_errors(field: str, text: str, max_chars: int, limit_name: str) -> list[dict]:
    """The planner's own check of a prompt or instruction (``validate_text``), as a 422 error.

    The character rule was already reported by ``text_errors``; this adds emptiness and length.
    """
    if bad_character(text) is not None:
        return []
    try:
        validate_text(text, field, max_chars, limit_name)
    except InvalidPrompt as exc:
        return [_error(field, str(exc), len(text))]
    return []


def limit_errors(body: GenerateRequest | PlanRequest | InstructRequest, settings: Settings) -> list[dict]:
    """Every limit of ``settings`` that ``body`` breaks, in FastAPI's 422 error format."""
    errors: list[dict] = text_errors(body.model_dump(exclude_defaults=True), ())
    seed = body.seed
    if seed is not None and not 0 <= seed <= settings.max_seed:
        errors.append(_error("seed", f"seed must be in 0..{settings.max_seed} (LMD_MAX_SEED)", seed))
    if isinstance(body, InstructRequest):
        errors += _planner_text_errors("instruction", body.instruction, settings.max_instruction_chars,
                                       "LMD_MAX_INSTRUCTION_CHARS")
        return errors

    layout = getattr(body, "layout", None)
    if body.prompt is None or not body.prompt.strip():
        if layout is None:
            errors.append(_error("prompt", "prompt is required (and not blank) unless a layout is given", body.prompt))
    else:
        errors += _planner_text_errors("prompt", body.prompt, settings.max_prompt_chars, "LMD_MAX_PROMPT_CHARS")
    if body.steps is not None and not 1 <= body.steps <= settings.max_steps:
        errors.append(_error("steps", f"steps must be in 1..{settings.max_steps} (LMD_MAX_STEPS)", body.steps))
    for field in ("width", "height"):
        value = getattr(body, field)
        if not settings.min_size <= value <= settings.max_size:
            errors.append(_error(field, f"{field} must be in {settings.min_size}..{settings.max_size} "
                                 "(LMD_MIN_SIZE, LMD_MAX_SIZE)", value))
        elif value % 8:
            errors.append(_error(field, f"{field} must be a multiple of 8 (the latent is 1/8 of the image)", value))
    if getattr(body, "refine", None) and not settings.refiner:
        errors.append(_error("refine", "refine needs an SDXL refiner: this service has none (LMD_REFINER is unset)", True))
    if layout is not None:
        # An empty layout (a prompt that names only what is absent) renders its background.
        if len(layout.objects) > settings.max_objects:
            errors.append(_error("layout", f"layout has {len(layout.objects)} objects; at most "
                                 f"{settings.max_objects} (LMD_MAX_OBJECTS)", len(layout.objects)))
    return errors
