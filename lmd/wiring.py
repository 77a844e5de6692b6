"""Settings in, objects out: the one place that turns ``lmd.settings.Settings`` into the stages' parts.

The stages take typed configs and never read settings; every process that runs them (the CLI
commands, the workers, ``lmd bench``, ``lmd eval``) builds them here, so a setting means the
same thing everywhere:

- :func:`load_settings`: the settings, or a one-line :class:`SettingsError` naming the
  ``LMD_`` variable at fault;
- :func:`choose_planner`, :func:`llm_config`, :func:`local_llm_config` and :func:`planner`:
  which stage 1 planner answers (``LMD_PLANNER``: an endpoint, or a model in the process)
  and why, its config, and the planner;
- :func:`pipeline_arguments` and :func:`load_pipeline`: stage 2's pipeline (torch threads,
  quiet library progress bars, ``from_pretrained`` arguments); :func:`check_precision`: its
  device and dtype checked before any work;
- :func:`check_render`: what a render cannot do with these settings, refused before any work;
- :func:`render_options`: the options of a preset by name with a request's overrides and
  ``LMD_MAX_BATCH``;
- :func:`load_refiner` and :func:`refiner_options`: the optional SDXL refiner pass;
- :func:`request_model`, :func:`model_source` and :func:`lora_choices`: the names an operator
  lists (``LMD_MODELS``, ``LMD_LORAS``) turned into files, or :class:`UnknownName`
  (docs/models.md).

torch, diffusers and the LLM client are imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from lmd.settings import Segmenter, Settings, get_settings

if TYPE_CHECKING:
    from grounded_sd import LMDOptions, LMDPipeline, Refiner, RefinerOptions
    from grounded_sd.conditioning import ConditioningCache, ConditioningConfig
    from grounded_sd.lora import LoraChoice
    from layout_planner import LLMConfig, Planner
    from layout_planner.local import LocalLLMConfig


class SettingsError(ValueError):
    """A setting (environment variable or .env line) is invalid; the message is one line."""


def describe_settings_error(exc: ValidationError) -> str:
    """The first problem of a settings validation, naming its ``LMD_`` variable when it has one."""
    first = exc.errors()[0]
    field = "_".join(map(str, first["loc"])).upper()
    where = f"setting LMD_{field}" if field else "settings"
    return f"invalid {where}: {first['msg'].removeprefix('Value error, ')}"


def load_settings(cached: bool = False) -> Settings:
    """The settings of this process (``cached``: the per-process copy the service shares)."""
    try:
        return get_settings() if cached else Settings()
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc)) from None


# --- stage 1 --------------------------------------------------------------------------------------
def llm_config(settings: Settings) -> "LLMConfig":
    """The planner's ``LLMConfig`` from the ``LMD_LLM_*`` settings and the prompt length limit."""
    from layout_planner import LLMConfig

    return LLMConfig(
        base_url=settings.llm_base_url,
        model=settings.llm_model,
        api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
        mode=settings.llm_mode,
        structured_output=settings.llm_structured_output,
        temperature=settings.llm_temperature,
        max_tokens=settings.llm_max_tokens,
        timeout_s=settings.llm_timeout_s,
        max_attempts=settings.llm_max_attempts,
        max_reasks=settings.llm_max_reasks,
        backoff_s=settings.llm_backoff_s,
        max_retry_after_s=settings.llm_max_retry_after_s,
        max_prompt_chars=settings.max_prompt_chars,
        deadline_s=settings.llm_deadline_s,
    )


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


def planner(settings: Settings, **kwargs: Any) -> "Planner":
    """A stage 1 planner, remote or local as :func:`choose_planner` says; ``kwargs`` go to ``Planner``
    (cache, on_retry, max_objects). A local model loads on first use."""
    from layout_planner import Planner

    local = choose_planner(settings).kind == "local"
    return Planner(local_llm_config(settings) if local else llm_config(settings), **kwargs)


def ready_planner(settings: Settings, say: Callable[[str], None] | None = None, *, check_endpoint: bool = False,
                  **kwargs: Any) -> "Planner":
    """:func:`planner`, with a local model announced to ``say`` (which, and why) and loaded now
    (downloading it first, with its size said), so that a missing model fails before any work;
    ``check_endpoint`` (the CLI): a remote endpoint that cannot be connected to fails now, in one
    request without retries (``LLMClient.check_reachable``).

    Raises ``LocalModelUnavailable`` whose message ends with what to change (the settings), or
    ``LLMUnavailable``.
    """
    from layout_planner.errors import LocalModelUnavailable

    choice = choose_planner(settings)
    if choice.kind == "remote":
        remote = planner(settings, on_retry=say, **kwargs)
        if check_endpoint:
            remote.client.check_reachable()
        return remote
    if say is not None:
        say(choice.describe())
    local = planner(settings, on_retry=say, **kwargs)
    try:
        local.client.load()
    except LocalModelUnavailable as exc:
        raise LocalModelUnavailable(f"{exc}; {LOCAL_MODEL_HINT}") from exc
    return local


# --- stage 2 --------------------------------------------------------------------------------------
def quiet_library_progress_bars() -> None:
    """Our own progress (bars, job progress) shows the stages; the libraries' weight-loading bars are noise."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def use_torch_threads(threads: int | None, cpu_default: int | None = None) -> None:
    """Set torch's CPU threads to ``threads``; without it, to ``cpu_default`` when no GPU is present.

    A render worker passes ``cpu_default=1``: it shares the machine with the other workers.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif cpu_default and not torch.cuda.is_available():
        torch.set_num_threads(cpu_default)


def pipeline_arguments(settings: Settings, *, use_sam: bool = True, **overrides: Any) -> dict[str, Any]:
    """``LMDPipeline.from_pretrained``'s arguments from the settings; an override that is not None wins.

    Overrides: ``model`` (an ``LMD_MODELS`` name, a hub id, a directory or a file), ``device``, ``dtype``, ``scheduler``, ``sam_checkpoint``,
    ``sam_model_type``. ``use_sam=False`` loads no SAM checkpoint (plain SD needs none).
    """
    arguments: dict[str, Any] = {
        "model": default_model(settings),
        "device": settings.device,
        "dtype": settings.dtype,
        "scheduler": settings.scheduler,
        "sam_checkpoint": settings.sam_checkpoint,
        "sam_model_type": settings.sam_model_type,
        "single_file_config": settings.single_file_config,
    }
    unknown = set(overrides) - set(arguments)
    if unknown:
        raise TypeError(f"unknown pipeline arguments: {sorted(unknown)}")
    arguments.update({k: v for k, v in overrides.items() if v is not None})
    arguments["model"] = model_source(settings, arguments["model"])
    checkpoint = arguments["sam_checkpoint"]
    arguments["sam_checkpoint"] = str(checkpoint) if checkpoint and use_sam else None
    return arguments


def check_precision(settings: Settings, *, device: str | None = None, dtype: str | None = None) -> None:
    """Resolve stage 2's device and dtype (``auto`` included) now, so that a pair that cannot work
    (float16 on a CPU) is a :class:`SettingsError` before any planning or loading starts."""
    from grounded_sd.errors import GroundedSDError
    from grounded_sd.pipeline import resolve_device, resolve_dtype

    try:
        resolve_dtype(dtype or settings.dtype, resolve_device(device or settings.device))
    except GroundedSDError as exc:
        raise SettingsError(str(exc)) from None


def load_pipeline(settings: Settings, *, cpu_threads: int | None = None, use_sam: bool = True,
                  segmenter: Segmenter | None = None, **overrides: Any) -> "LMDPipeline":
    """Stage 2's pipeline as the settings (and ``overrides``, see :func:`pipeline_arguments`) describe it.

    ``segmenter`` (default ``LMD_SEGMENTER``): ``shapes`` gives the pipeline the shapes world's
    colour segmenter in SAM's place (lmd.shapes.segmenter); it excludes a SAM checkpoint."""
    from grounded_sd import LMDPipeline

    segmenter = segmenter or settings.segmenter
    if segmenter == "shapes" and overrides.get("sam_checkpoint") is not None:
        raise SettingsError("the shapes segmenter and a SAM checkpoint were both given: choose one segmenter")
    use_torch_threads(settings.torch_threads, cpu_default=cpu_threads)
    quiet_library_progress_bars()
    arguments = pipeline_arguments(settings, use_sam=use_sam and segmenter == "sam", **overrides)
    pipe = LMDPipeline.from_pretrained(arguments.pop("model"), **arguments)
    if segmenter == "shapes" and use_sam:
        from lmd.shapes.segmenter import ShapesSegmenter

        pipe.sam_predictor = ShapesSegmenter()
    return pipe


def conditioning_config(settings: Settings) -> "ConditioningConfig":
    """Where ELLA's and GlueNet's files are (``LMD_ELLA_*``, ``LMD_GLUENET_*``)."""
    from grounded_sd.preflight import ConditioningConfig  # no torch: the API checks requests with it

    return ConditioningConfig(
        ella_checkpoint=settings.ella_checkpoint, ella_t5=settings.ella_t5, ella_negative=settings.ella_negative,
        gluenet_checkpoints=settings.gluenet_checkpoints, gluenet_xlmr=settings.gluenet_xlmr,
    )


def conditionings(settings: Settings, pipe: "LMDPipeline") -> "ConditioningCache":
    """The process's conditionings beside ``pipe``: each loaded the first time it is asked for."""
    from grounded_sd.conditioning import ConditioningCache

    return ConditioningCache(conditioning_config(settings), device=pipe.device, dtype=pipe.dtype)


def check_render(settings: Settings, *, variant: str, conditioning: str, prompt: str | None, language: str | None,
                 model: str | None = None, download: bool = True) -> str | None:
    """Refuse, before any work, a render these settings cannot run (``grounded_sd.preflight``):
    the conditioning's files and GlueNet's language, then the variant against the UNet's config
    (``download=False``: only from a local directory or the hub cache, as the API checks). No torch.
    Returns the language GlueNet will read; raises the stage's ``ConditioningUnavailable``,
    ``VariantUnavailable`` or ``ModelLoadError``."""
    from grounded_sd.preflight import check_conditioning, check_variant

    language = check_conditioning(conditioning, conditioning_config(settings), source_prompt=prompt, language=language)
    check_variant(model_source(settings, model) if model else default_model(settings), variant, download=download)
    return language


def render_options(settings: Settings, preset: str, **overrides: Any) -> "LMDOptions":
    """The options of ``preset`` with the overrides that are not None; ``max_batch`` and
    ``guidance_checkpointing`` default to LMD_MAX_BATCH and LMD_GUIDANCE_CHECKPOINTING."""
    from grounded_sd import LMDOptions

    chosen = {
        "max_batch": settings.max_batch, "guidance_checkpointing": settings.guidance_checkpointing,
        **{k: v for k, v in overrides.items() if v is not None},
    }
    return LMDOptions.preset(preset, **{k: v for k, v in chosen.items() if v is not None})



def load_refiner(settings: Settings, *, model: str | None = None, device: str | None = None,
                 dtype: str | None = None) -> "Refiner | None":
    """The SDXL refiner ``model`` (default ``LMD_REFINER``) on the pipeline's device and dtype; None when unset."""
    from grounded_sd import Refiner

    model = model or settings.refiner
    if not model:
        return None
    quiet_library_progress_bars()
    return Refiner.from_pretrained(model, device=device or settings.device, dtype=dtype or settings.dtype)


def refiner_options(settings: Settings, strength: float | None = None) -> "RefinerOptions":
    """The refiner pass's options: ``strength`` (default ``LMD_REFINER_STRENGTH``) at ``LMD_REFINER_RESOLUTION``."""
    from grounded_sd import RefinerOptions

    return RefinerOptions(
        strength=strength if strength is not None else settings.refiner_strength, resolution=settings.refiner_resolution
    )


# --- the models and adapters an operator lists (docs/models.md) -----------------------------------
class UnknownName(ValueError):
    """A request names a model or LoRA adapter the operator did not list; ``field`` is the request's
    field (``model``, ``loras``) and the message names the choices."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def default_model(settings: Settings) -> str:
    """What this process renders with when nothing names a model: ``LMD_WORKER_MODEL``'s (else the
    first) entry of ``LMD_MODELS``, or ``LMD_SD_MODEL`` when the list is empty."""
    if settings.models:
        return settings.models[settings.worker_model or next(iter(settings.models))]
    return settings.sd_model


def model_source(settings: Settings, model: str) -> str:
    """``model`` as a loader takes it: an ``LMD_MODELS`` name becomes its hub id, directory or file;
    anything else (a hub id, a path) is returned as it is."""
    return settings.models.get(model, model)


def request_model(settings: Settings, name: str | None) -> str | None:
    """The ``LMD_MODELS`` name a request's job renders with (None: the service has no list, so
    ``LMD_SD_MODEL``), or :class:`UnknownName`. A request that names none gets the first."""
    if not settings.models:
        if name is None:
            return None
        raise UnknownName("model", f"unknown model {name!r}: this service renders one model (LMD_MODELS is unset); omit model")
    if name is None:
        return next(iter(settings.models))
    if name not in settings.models:
        raise UnknownName("model", f"unknown model {name!r}; choose one of: {', '.join(settings.models)}")
    return name


def lora_choices(settings: Settings, requested: Sequence[tuple[str, float]]) -> "list[LoraChoice]":
    """The adapters a request names (name, weight) with their ``LMD_LORAS`` files, or :class:`UnknownName`."""
    from grounded_sd.lora import LoraChoice

    names = [name for name, _ in requested]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UnknownName("loras", f"LoRA {twice[0]!r} is named twice; name each adapter once")
    for name in names:
        if name not in settings.loras:
            known = ", ".join(settings.loras) or "none (LMD_LORAS is empty)"
            raise UnknownName("loras", f"unknown LoRA {name!r}; this service has: {known}")
    return [LoraChoice(name=name, path=settings.loras[name], weight=float(weight)) for name, weight in requested]
