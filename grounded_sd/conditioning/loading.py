"""Build a conditioning by name from configured paths (the CLI and the worker call this once
per process and name, then reuse the result)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from grounded_sd.conditioning.base import ClipConditioning, Conditioning
from grounded_sd.errors import ConditioningUnavailable
from grounded_sd.names import CONDITIONINGS

if TYPE_CHECKING:
    import torch

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


def load_conditioning(name: str, config: ConditioningConfig, *, device: str | torch.device, dtype: torch.dtype) -> Conditioning:
    """The conditioning ``name`` with its encoders on ``device``; :class:`ConditioningUnavailable`
    (naming the setting) when a file is missing or does not match."""
    names = config.settings_names
    if name == "clip":
        return ClipConditioning()
    if name.startswith("connector:"):  # an export of lmd train-connector
        from grounded_sd.conditioning.connector import PREFIX, ConnectorConditioning

        return ConnectorConditioning.from_path(name.removeprefix(PREFIX), device=device, dtype=dtype)
    if name == "ella":
        from grounded_sd.conditioning.ella import ELLAConditioning

        if not config.ella_checkpoint:
            message = f"ella needs its connector checkpoint: set {names['ella_checkpoint']}"
            raise ConditioningUnavailable(message, public=message)  # a setting's name, no value
        return ELLAConditioning.from_pretrained(
            config.ella_checkpoint, config.ella_t5, device=device, dtype=dtype,
            checkpoint_setting=names["ella_checkpoint"], encoder_setting=names["ella_t5"], negative=config.ella_negative,
        )
    if name == "gluenet":
        from grounded_sd.conditioning.gluenet import GlueNetConditioning

        checkpoints: dict[str, str | Path] = dict(config.gluenet_checkpoints)
        return GlueNetConditioning.from_pretrained(
            checkpoints, config.gluenet_xlmr, device=device, dtype=dtype,
            checkpoints_setting=names["gluenet_checkpoints"], encoder_setting=names["gluenet_xlmr"],
        )
    raise ConditioningUnavailable(f"unknown conditioning {name!r}; choose one of {', '.join(CONDITIONINGS)} or connector:PATH")


class ConditioningCache:
    """Each conditioning loaded the first time a generation asks for it, then reused: one
    cache per process (the CLI's run, a render worker process), beside the loaded pipeline."""

    def __init__(self, config: ConditioningConfig, *, device: "str | torch.device", dtype: "torch.dtype") -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.loaded: dict[str, Conditioning] = {"clip": ClipConditioning()}

    def get(self, name: str) -> Conditioning:
        if name not in self.loaded:
            self.loaded[name] = load_conditioning(name, self.config, device=self.device, dtype=self.dtype)
        return self.loaded[name]
