"""The names every layer shares: variants, option presets, dtypes, SAM model types, conditionings.

Defined once here and used by the pipeline, the settings, the CLI's choices, the API schema,
bench and eval. Nothing here imports torch or the LLM client, so reading a name is cheap.
The object cap is the layout's (``layout_planner.layout.MAX_OBJECTS``).
"""

from __future__ import annotations

from typing import Literal, get_args

Variant = Literal["lmd", "sd", "lmd_plus"]
"""lmd: the method; sd: plain Stable Diffusion with the layout's prompt (the baseline);
lmd_plus: lmd with GLIGEN adapters in the per-box pass (needs a GLIGEN UNet)."""
VARIANTS: tuple[str, ...] = get_args(Variant)

GroundedVariant = Literal["lmd", "lmd_plus"]
"""The variants that run the per-box pass and the final pass (what bench measures)."""
GROUNDED_VARIANTS: tuple[str, ...] = get_args(GroundedVariant)

Preset = Literal["reference", "fast"]
"""Named option sets of ``LMDOptions``: the reference defaults, and the fast preset."""
PRESETS: tuple[str, ...] = get_args(Preset)

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
"""Weights' dtype; auto: float16 on CUDA, float32 elsewhere."""
DTYPES: tuple[str, ...] = get_args(Dtype)

SamModelType = Literal["vit_h", "vit_l", "vit_b"]
"""Architectures of the published SAM checkpoints (mask refinement)."""
SAM_MODEL_TYPES: tuple[str, ...] = get_args(SamModelType)

ConditioningName = Literal["clip", "ella", "gluenet"]
"""What the render denoises with: CLIP (the model's own encoder), ELLA or GlueNet
(grounded_sd/conditioning/; a trained connector is named ``connector:PATH`` on top of these)."""
CONDITIONINGS: tuple[str, ...] = get_args(ConditioningName)
