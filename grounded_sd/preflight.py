"""A generation's configuration checked before any work, from names, files and config files alone.

No torch, no weights, no hub call unless asked: the CLI runs these before planning (stage 1's
LLM call) and the API when it accepts a job, so that configuration that cannot work is refused
at once instead of after planning or after loading models for a minute (our design).

- :class:`ConditioningConfig` and :func:`check_conditioning`: ELLA's and GlueNet's files, and
  GlueNet's checkpoint for the prompt's language;
- :func:`check_variant`: ``lmd_plus`` needs a GLIGEN UNet, read from the UNet's config.json;
- :func:`check_file`, :func:`hub_file`, :func:`check_encoder_source`: the rules the loaders
  follow for a local file or directory versus a name on the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from grounded_sd.errors import ConditioningUnavailable, LanguageUnavailable, ModelLoadError, SourcePromptMissing, VariantUnavailable
from grounded_sd.names import CONDITIONINGS
from layout_planner.hub_ids import is_hub_id  # no torch, no openai at import time

DEFAULT_ELLA_CHECKPOINT = "QQGYLab/ELLA/ella-sd1.5-tsc-t5xl.safetensors"
DEFAULT_T5 = "google/flan-t5-xl"
DEFAULT_XLMR = "FacebookAI/xlm-roberta-large"


class ConditioningConfig(BaseModel):
    """Where each conditioning's files are; ``settings_names`` maps a field to the setting
    that fills it, so errors can name it."""

    ella_checkpoint: str | None = Field(DEFAULT_ELLA_CHECKPOINT, description="ELLA connector: .safetensors path or owner/repo/file")
    ella_t5: str = Field(DEFAULT_T5, description="T5 encoder: hub id or local directory")
    ella_negative: Literal["layout", "empty"] = Field(
        "layout", description="ELLA's default negative: the layout's negative prompt, or \"\" as the official pipeline"
    )
    gluenet_checkpoints: dict[str, str] = Field(default_factory=dict, description="ISO 639-1 language -> GlueNet checkpoint")
    gluenet_xlmr: str = Field(DEFAULT_XLMR, description="XLM-RoBERTa-large: hub id or local directory")
    settings_names: dict[str, str] = Field(
        default_factory=lambda: {
            "ella_checkpoint": "LMD_ELLA_CHECKPOINT",
            "ella_t5": "LMD_ELLA_T5",
            "gluenet_checkpoints": "LMD_GLUENET_CHECKPOINTS",
            "gluenet_xlmr": "LMD_GLUENET_XLMR",
        }
    )


def check_conditioning(
    name: str, config: ConditioningConfig, *, source_prompt: str | None = None, language: str | None = None
) -> str | None:
    """What ``load_conditioning`` and the generation would refuse, found before any work
    from the settings and the file system alone (no weights load, no hub call): an unknown name,
    a missing checkpoint file or encoder directory, GlueNet without the user's prompt or without
    a checkpoint for its language. Raises :class:`ConditioningUnavailable` naming the setting;
    returns the language GlueNet will read (``language``, else detected from ``source_prompt``).
    Files named on the hub (``owner/repo/file``, hub ids) are left to the loaders."""
    names = config.settings_names
    if name == "clip":
        return None
    if name.startswith("connector:"):
        from grounded_sd.conditioning.trained import check_export  # torch: the CLI's path only

        check_export(name.removeprefix("connector:"))
        return None
    if name == "ella":
        if not config.ella_checkpoint:
            message = f"ella needs its connector checkpoint: set {names['ella_checkpoint']}"
            raise ConditioningUnavailable(message, public=message)  # a setting's name, no value
        check_file(config.ella_checkpoint, names["ella_checkpoint"])
        check_encoder_source(config.ella_t5, kind="t5", setting=names["ella_t5"])
        return None
    if name == "gluenet":
        return _check_gluenet(config, source_prompt, language)
    raise ConditioningUnavailable(f"unknown conditioning {name!r}; choose one of {', '.join(CONDITIONINGS)} or connector:PATH")


def _check_gluenet(config: ConditioningConfig, source_prompt: str | None, language: str | None) -> str:
    from layout_planner.language import detect_language, normalize_language

    names = config.settings_names
    if not config.gluenet_checkpoints:
        message = f"gluenet needs at least one per-language checkpoint: set {names['gluenet_checkpoints']}"
        raise ConditioningUnavailable(message, public=message)  # a setting's name, no value
    if not source_prompt:
        raise SourcePromptMissing(
            "gluenet denoises with the user's prompt in its own language; this generation has none "
            "(a layout was given without the prompt it came from)"
        )
    try:
        language = normalize_language(language) if language else detect_language(source_prompt)
    except ValueError as exc:
        raise ConditioningUnavailable(f"gluenet: {exc}") from exc
    checkpoints = {key.lower(): value for key, value in config.gluenet_checkpoints.items()}
    if language not in checkpoints:
        configured = sorted(checkpoints)
        raise LanguageUnavailable(
            f"gluenet has no checkpoint for language {language!r}, the prompt's (configured: {', '.join(configured)}; "
            f"set {names['gluenet_checkpoints']}, or give the prompt's language)", language, configured
        )
    check_file(checkpoints[language], f"{names['gluenet_checkpoints']}[{language}]")
    check_encoder_source(config.gluenet_xlmr, kind="xlmr", setting=names["gluenet_xlmr"])
    return language


def hub_file(source: str | Path) -> bool:
    """Whether ``source`` names a file on the hub (``owner/repo/path/in/repo``, no existing path)."""
    text = str(source)
    return not Path(text).expanduser().exists() and len(text.split("/")) >= 3 and not text.startswith(("/", ".", "~"))


def check_file(source: str | Path, setting: str) -> None:
    """:class:`ConditioningUnavailable` unless ``source`` is an existing file or a hub file."""
    if not Path(str(source)).expanduser().is_file() and not hub_file(source):
        raise ConditioningUnavailable(f"{setting}: {source} is not a file")


def check_encoder_source(source: str | Path, *, kind: str, setting: str) -> None:
    """:class:`ConditioningUnavailable` when ``source`` is no hub id and no existing directory
    (said as a missing directory, not as the hub's "Repo id must be in the form ...")."""
    local = Path(str(source)).expanduser()
    if not is_hub_id(str(source)) and not local.is_dir():
        what = "is a file, not a directory" if local.exists() else "does not exist"
        raise ConditioningUnavailable(
            f"{setting}: the {kind} encoder directory {source} {what}; set {setting} to a directory "
            "holding config.json, the weights and the tokenizer, or to a hub id"
        )


GLIGEN_ATTENTION = "gated"  # a UNet config's attention_type with GLIGEN's gated self-attention (diffusers)


def check_variant(model: str | Path, variant: str, *, download: bool = True) -> None:
    """Refuse a variant ``model`` cannot run: ``lmd_plus`` on a UNet without GLIGEN, read from the
    UNet's config.json alone (no weights): a local directory's, else the hub's (one small file,
    or the cache's; ``download=False``: the cache's only, and no check without it).
    :class:`VariantUnavailable`, or :class:`ModelLoadError` when the config cannot be read."""
    if variant != "lmd_plus":
        return
    local = Path(str(model)).expanduser()
    if local.is_file():
        raise VariantUnavailable(f"variant lmd_plus needs a GLIGEN UNet; {local.name} is a single-file SD checkpoint, "
                                 "which loads without GLIGEN: use variant lmd")
    try:
        if local.exists():
            path = local / "unet" / "config.json"
        elif download:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(model), "unet/config.json"))
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model), "unet/config.json")
            if not isinstance(cached, str):
                return  # not known here; the render worker checks when it loads the model
            path = Path(cached)
        config = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # a missing file, unreadable JSON, or any hub error: the model cannot be read
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelLoadError(f"cannot read the UNet config of {model!r} to check variant lmd_plus: {first}") from exc
    attention = config.get("attention_type", "default")
    if attention != GLIGEN_ATTENTION:
        raise VariantUnavailable(
            f"variant lmd_plus needs a GLIGEN UNet (attention_type {GLIGEN_ATTENTION!r}); the UNet of {model} has "
            f"{attention!r}: use variant lmd, or a GLIGEN model (docs/controller.md)"
        )
