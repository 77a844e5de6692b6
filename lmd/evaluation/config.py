"""What one ``lmd eval`` run is asked to do: a typed config checked before anything loads.

The CLI fills it from its arguments (``None``: the setting's value, ``LMD_SD_MODEL``...); a
bad value is a ``ValidationError`` whose message the CLI prefixes with the option's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from grounded_sd.names import Dtype, Preset, SamModelType, Variant
from lmd.evaluation.detection import DEFAULT_DETECTOR
from lmd.evaluation.prompts import DEFAULT_PROMPTS
from lmd.settings import Segmenter
from lmd.shapes import SHAPES_DETECTOR, SHAPES_MODEL, SHAPES_PROMPTS, SHAPES_SIZE


class EvalConfig(BaseModel):
    """One image-level benchmark run; field order is the order in which problems are reported."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path
    world: Literal["lmd", "shapes"] = "lmd"
    layouts: Literal["stored", "planner"] | None = None
    responses: Path | None = None
    baseline: Literal["sd"] | None = None
    variant: Variant = "lmd"
    preset: Preset = "reference"
    conditioning: str = "clip"
    size: int | None = None
    steps: int | None = None
    max_batch: int | None = None
    limit: int | None = None
    seed: int = 0
    model: str | None = None
    device: str | None = None
    dtype: Dtype | None = None
    sam_checkpoint: Path | None = None
    sam_model_type: SamModelType | None = None
    segmenter: Segmenter | None = None
    detector: str | None = None
    score_threshold: float = 0.15
    nms_iou: float = 0.15
    prompts: Path | None = None
    method: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _world_defaults(cls, values: dict) -> dict:
        """Unset options take the world's defaults: the shapes world has its own prompts (with
        stored perfect layouts), image size, model and exact detector (docs/shapes.md)."""
        if not isinstance(values, dict):
            return values
        values = {k: v for k, v in values.items() if v is not None}
        shapes = values.get("world") == "shapes"
        values.setdefault("size", SHAPES_SIZE if shapes else 512)
        values.setdefault("prompts", SHAPES_PROMPTS if shapes else DEFAULT_PROMPTS)
        values.setdefault("detector", SHAPES_DETECTOR if shapes else DEFAULT_DETECTOR)
        if shapes:
            values.setdefault("model", str(SHAPES_MODEL))
            if "sam_checkpoint" not in values:  # SAM's part on flat shapes: their colour regions (docs/shapes.md)
                values.setdefault("segmenter", "shapes")
            if "responses" not in values and "baseline" not in values:
                values.setdefault("layouts", "stored")
        return values

    @field_validator("size")
    @classmethod
    def _size(cls, size: int) -> int:
        if size < 64 or size % 8:
            raise ValueError(f"must be a multiple of 8 of at least 64, got {size}")
        return size

    @field_validator("steps", "max_batch", "limit")
    @classmethod
    def _at_least_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("score_threshold", "nms_iou")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must lie in 0..1")
        return value

    @model_validator(mode="after")
    def _baseline_alone(self) -> "EvalConfig":
        if self.baseline and self.variant != "lmd":
            raise ValueError("--baseline sd renders the prompt without a layout; it does not combine with --variant")
        if self.layouts and (self.baseline or self.responses):
            raise ValueError("--layouts chooses where layouts come from; it does not combine with --baseline or --responses")
        if self.segmenter == "shapes" and self.sam_checkpoint is not None:
            raise ValueError("--segmenter shapes cuts masks without SAM; it does not combine with --sam-checkpoint")
        return self

    @property
    def rendered_variant(self) -> Variant:
        """The variant stage 2 runs: the SD baseline renders plain SD."""
        return "sd" if self.baseline else self.variant
