"""Stage 2: the layout-grounded controller over a frozen Stable Diffusion (docs/method.md §2).

The entry point is ``LMDPipeline`` (pipeline.py), whose call reads as numbered steps; each
step of the grounded run has its own module: per_box.py (the per-box pass), segment.py (the
masks, with masks.py segmenting one object), compose.py (noise and composition) and
final_pass.py (the final pass), all running the one denoising loop of denoise.py, with
attention capture in attention.py and the energy and backward guidance in guidance.py. The
options are in options.py, the names shared with the service and the CLI (variants,
presets, dtypes; no torch) in names.py, the returned report in report.py, the errors in
errors.py, optional text conditioning in conditioning/.

Heavy imports (torch, diffusers) happen on first use of a name, so ``import grounded_sd``
stays cheap for callers that only need, say, the options.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LMDPipeline": "grounded_sd.pipeline",
    "LMDOptions": "grounded_sd.options",
    "GenerationResult": "grounded_sd.report",
    "GenerationReport": "grounded_sd.report",
    "GenerationCanceled": "grounded_sd.errors",
    "InvalidRequest": "grounded_sd.errors",
    "InvalidLayoutError": "grounded_sd.errors",
    "InvalidOptions": "grounded_sd.errors",
    "InvalidSize": "grounded_sd.errors",
    "UnknownVariant": "grounded_sd.errors",
    "ModelLoadError": "grounded_sd.errors",
    "VariantUnavailable": "grounded_sd.errors",
    "GroundedSDError": "grounded_sd.errors",
    "NonFiniteLatents": "grounded_sd.errors",
    "Refiner": "grounded_sd.refiner",
    "RefinerOptions": "grounded_sd.refiner",
    "NoImageParameters": "grounded_sd.errors",
    "ImageParameters": "grounded_sd.image_parameters",
    "read_parameters": "grounded_sd.image_parameters",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from grounded_sd.errors import (
        GenerationCanceled,
        GroundedSDError,
        InvalidLayoutError,
        InvalidOptions,
        InvalidRequest,
        InvalidSize,
        ModelLoadError,
        NoImageParameters,
        NonFiniteLatents,
        UnknownVariant,
        VariantUnavailable,
    )
    from grounded_sd.image_parameters import ImageParameters, read_parameters
    from grounded_sd.options import LMDOptions
    from grounded_sd.pipeline import LMDPipeline
    from grounded_sd.refiner import Refiner, RefinerOptions
    from grounded_sd.report import GenerationReport, GenerationResult


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'grounded_sd' has no attribute {name!r}")
