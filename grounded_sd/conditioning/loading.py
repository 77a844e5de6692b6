"""Build a conditioning by name from configured paths (the CLI and the worker call this once
per process and name, then reuse the result)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from grounded_sd.conditioning.base import ClipConditioning, Conditioning
from grounded_sd.errors import ConditioningUnavailable
from grounded_sd.names import CONDITIONINGS
from grounded_sd.preflight import (  # noqa: F401  (re-exported: the config's home was here)
    DEFAULT_ELLA_CHECKPOINT,
    DEFAULT_T5,
    DEFAULT_XLMR,
    ConditioningConfig,
    check_conditioning,
)

if TYPE_CHECKING:
    import torch

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

        check_conditioning(name, config)
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
