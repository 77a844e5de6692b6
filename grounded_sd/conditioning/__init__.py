"""Text conditionings of the denoising forwards: ``clip`` (default), ``ella``, ``gluenet``.

See :mod:`grounded_sd.conditioning.base` for the interface and how each combines with LMD's
guidance, and docs/conditioning.md for weights, memory and published results.
"""

from grounded_sd.conditioning.base import (
    ClipConditioning,
    ClipEmbeddings,
    Conditioned,
    Conditioning,
    Mode,
    Pass,
    TextInputs,
)
from grounded_sd.conditioning.loading import ConditioningCache, ConditioningConfig, load_conditioning
from grounded_sd.names import CONDITIONINGS, ConditioningName

__all__ = [
    "CONDITIONINGS",
    "ClipConditioning",
    "ClipEmbeddings",
    "Conditioned",
    "Conditioning",
    "ConditioningCache",
    "ConditioningConfig",
    "ConditioningName",
    "Mode",
    "Pass",
    "TextInputs",
    "load_conditioning",
]
