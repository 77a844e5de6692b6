"""The service's records: a job, a session of turns, an Idempotency-Key claim (docs/service.md "Job lifecycle").

Plain pydantic models, stored as JSON in Redis by ``jobs.store`` and shown (reshaped) by the
API's schemas. A job's ``state`` moves only through ``jobs.transitions``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from grounded_sd.lora import LoraUse
from grounded_sd.names import Preset
from layout_planner.layout import Layout

JobState = Literal["queued", "planning", "rendering", "succeeded", "failed", "canceled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
Stage = Literal["plan", "render"]

ErrorCode = Literal[
    "invalid_prompt",
    "llm_unavailable",
    "llm_bad_output",
    "invalid_layout",
    "variant_unavailable",
    "model_unavailable",
    "no_layout",
    "out_of_memory",
    "timeout",
    "worker_lost",
    "canceled",
    "enqueue_failed",
    "internal",
]


JobKind = Literal["generate", "instruct", "plan"]


class PreviewInfo(BaseModel):
    """The latest live preview of a render (``GET /jobs/{id}/preview``): which one, and of which step."""

    count: int = Field(description="previews written so far; a new one is there when it grows")
    stage: str = Field(description="per_box, compose, final or sd")
    step: int
    total: int


class Progress(BaseModel):
    """Where a job is: a stage name and a step count within it, and its latest preview if it asked for them."""

    stage: str = "queued"
    step: int = 0
    total: int = 0
    preview: PreviewInfo | None = None


class JobError(BaseModel):
    """Why a job failed: a code a client can branch on, a message a person can act on."""

    code: ErrorCode
    message: str


class JobRecord(BaseModel):
    job_id: str
    session_id: str
    owner: str | None = None
    kind: JobKind = "generate"
    turn: int = 1
    prompt: str
    layout: Layout | None = None
    layout_given: bool = False
    seed: int
    steps: int | None = None
    guidance_scale: float | None = None
    width: int = 512
    height: int = 512
    negative_prompt: str | None = None
    variant: str = "lmd"
    preset: Preset = "reference"
    refine: bool | None = Field(None, description="SDXL refiner pass: None as the worker's LMD_REFINER says, False off, True required")
    conditioning: str = Field("clip", description="what the render denoises with: clip, ella, gluenet (docs/conditioning.md)")
    language: str | None = Field(None, description="ISO 639-1 code of source_prompt named by the request; None: detected")
    source_prompt: str | None = Field(None, description="the user's own prompt (an instruct keeps its session's)")
    previews: bool = Field(False, description="write a live preview every few steps of the render")
    model: str | None = Field(None, description="the LMD_MODELS name it renders with (its render queue); None: the one model")
    loras: list[LoraUse] = Field(default_factory=list, description="LoRA adapters (LMD_LORAS names) and their weights")
    state: JobState = "queued"
    progress: Progress = Field(default_factory=Progress)
    error: JobError | None = None
    cancel_requested: bool = False
    deliveries: int = Field(0, description="how many times a worker started the current stage")
    worker: str | None = Field(None, description="'hostname:pid' of the process running the current stage")
    heartbeat_at: float | None = None
    idempotency_claim: str | None = Field(None, description="the Redis key of the Idempotency-Key claim that created "
                                                              "the job: it expires with the job")
    created_at: datetime
    updated_at: datetime

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class SessionTurn(BaseModel):
    turn: int
    kind: JobKind
    text: str
    job_id: str


class SessionRecord(BaseModel):
    session_id: str
    owner: str | None = None
    seed: int
    turns: list[SessionTurn] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime


class IdempotencyRecord(BaseModel):
    """What an Idempotency-Key was first used for: the body's hash and the answer given."""

    body_hash: str
    job_id: str
    session_id: str
    turn: int


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def body_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
