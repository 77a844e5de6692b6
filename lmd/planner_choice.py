"""Which layout planner answers, and why: an OpenAI-compatible endpoint (remote) or a model in this process (local).

``LMD_PLANNER`` decides: ``remote``, ``local``, or ``auto`` (the default): remote when an
endpoint (``LMD_LLM_BASE_URL``) or a key (``LMD_LLM_API_KEY``, ``OPENAI_API_KEY``) is
configured, local otherwise, so a fresh machine plans without any account. The CLI, the
plan worker and ``/readyz`` all ask :func:`choose_planner`, so they agree and can say why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lmd.settings import Settings

if TYPE_CHECKING:
    from layout_planner.local import LocalLLMConfig

# Appended to a local model that cannot be found or loaded: what to change.
LOCAL_MODEL_HINT = (
    "set LMD_LOCAL_LLM_MODEL to a local model directory (or run once online to download it), "
    "or LMD_PLANNER=remote with LMD_LLM_BASE_URL / LMD_LLM_API_KEY"
)


@dataclass(frozen=True)
class PlannerChoice:
    """``kind`` of planner, its ``model`` (and ``endpoint`` when remote), and the ``reason`` it was chosen."""

    kind: Literal["remote", "local"]
    model: str
    reason: str
    endpoint: str | None = None

    def describe(self) -> str:
        if self.kind == "local":
            return f"local layout model {self.model}, run in this process ({self.reason})"
        return f"layout model {self.model} at {self.endpoint} ({self.reason})"


def choose_planner(settings: Settings) -> PlannerChoice:
    """The planner ``settings`` select, with the reason in a few words naming the settings."""
    if settings.planner == "auto":
        if settings.llm_api_key is not None:
            kind, reason = "remote", "LMD_PLANNER=auto and an LLM API key is set"
        elif "llm_base_url" in settings.model_fields_set:
            kind, reason = "remote", "LMD_PLANNER=auto and LMD_LLM_BASE_URL is set"
        else:
            kind, reason = "local", "LMD_PLANNER=auto and no LLM endpoint or key is configured"
    else:
        kind, reason = settings.planner, f"LMD_PLANNER={settings.planner}"
    if kind == "local":
        return PlannerChoice("local", settings.local_llm_model, reason)
    return PlannerChoice("remote", settings.llm_model, reason, endpoint=settings.llm_base_url)


def local_llm_config(settings: Settings) -> "LocalLLMConfig":
    """The local planner's config from the ``LMD_LOCAL_LLM_*`` settings (temperature and re-asks as for remote)."""
    from layout_planner.local import LocalLLMConfig

    return LocalLLMConfig(
        model=settings.local_llm_model,
        device=settings.local_llm_device,
        dtype=settings.local_llm_dtype,
        temperature=settings.llm_temperature,
        max_tokens=settings.local_llm_max_new_tokens,
        timeout_s=settings.local_llm_timeout_s,
        max_reasks=settings.llm_max_reasks,
        max_prompt_chars=settings.max_prompt_chars,
    )
