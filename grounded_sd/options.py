"""Every knob of the layout-grounded controller, with the reference defaults (docs/method.md §2).

Step counts that the reference states "of 50" (guidance steps, the iteration schedule, the
first step of mask aggregation) are kept on that 50-step scale here and scaled to the actual
step count by :meth:`LMDOptions.scaled`, so that ``steps=20`` keeps the same shape of schedule.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from grounded_sd.guidance import GuidanceStop
from grounded_sd.masks import MaskOptions
from layout_planner.layout import MAX_OBJECTS

REFERENCE_STEPS = 50
"""The step count the reference's step-indexed defaults are written for."""

DEFAULT_NEGATIVE = (
    "artifacts, blurry, smooth texture, bad quality, distortions, unrealistic, distorted image, bad proportions, duplicate"
)
"""The reference's negative prompt of the final pass (prompt.py:44, DEFAULT_OVERALL_NEGATIVE_PROMPT)."""
SINGLE_OBJECT_NEGATIVE_WORDS = "two, many, group, occlusion, occluded, side, border, collate"
"""What the reference's per-box negative adds to the final pass's (prompt.py:43, DEFAULT_SO_NEGATIVE_PROMPT is
DEFAULT_NEGATIVE followed by these words)."""
QUALITY_NEGATIVE = "low quality, blurry, deformed, disfigured, bad anatomy, watermark, text"
"""Our negative words before issue 23 (``default_negative=QUALITY_NEGATIVE`` brings them back)."""
QUALITY_SINGLE_OBJECT_NEGATIVE = "duplicate, two, many, group, occlusion, occluded, side, border, collate"
"""Our per-box words before issue 23, used with ``per_box_negative_order="single_object_first"``."""

REFERENCE_BOX_NOISE_RATIO = {"lmd": 0.01, "lmd_plus": 0.1}
"""The reference's ``fg_blending_ratio`` per variant (generation/lmd.py:240, generation/lmd_plus.py:216)."""


class LMDOptions(BaseModel):
    """Options of one generation; ``LMDOptions.reference()`` equals the defaults below."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- the layout's boxes -------------------------------------------------------------------
    rescale_boxes: bool = Field(
        True,
        description=(
            "before generating, move and scale the layout's boxes to span the canvas, at most 3x (the reference's "
            "default, utils/parse.py:126-226 via generate.py:206, 292; layout_planner.rescale); the layout's warnings "
            "and the report's box_rescale say by how much. False (fast preset): the boxes as planned"
        ),
    )

    # --- denoising (§2) ------------------------------------------------------------------
    steps: int = Field(50, ge=1, le=1000, description="denoising steps of every pass")
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance scale")
    default_negative: str = Field(DEFAULT_NEGATIVE, description="appended to every negative prompt (§2.6)")

    # --- backward guidance (§2.1, §2.2), on the 50-step scale ------------------------------
    guidance_steps: int = Field(30, ge=0, le=REFERENCE_STEPS, description="guided steps, of 50 (ref 30)")
    iteration_schedule: list[tuple[int, int]] = Field(
        default_factory=lambda: [(5, 4), (10, 3), (20, 2), (30, 1)],
        description="(until step, of 50; iterations per step) in order: ref 4 for 0-4, 3 for 5-9, 2 for 10-19, 1 for 20-29",
    )
    step_schedule: Literal["scaled", "absolute"] = Field(
        "scaled",
        description=(
            "the step indices above (guided steps, iteration schedule, mask_from_step) at other step counts: 'scaled' "
            "keeps their share of the run (round(n * steps / 50)); 'absolute': step indices as given, as the reference's "
            "code reads them (generation/lmd.py:224-225, models/pipelines.py:20-25), which at 20 steps guides every step"
        ),
    )
    loss_scale: float = Field(5.0, ge=0.0, description="z -= scale * sqrt(1 - alpha_bar_t) * dE/dz (ref 5)")
    loss_threshold: float = Field(5.0, ge=0.0, description="guidance stops once E is at or under this (ref 5.0); when, see guidance_stop")
    guidance_stop: GuidanceStop = Field(
        "pass",
        description=(
            "'pass' (reference): the update computed at the first energy at or under the threshold is applied, then "
            "the row is not guided again in that pass; 'step' (fast preset): the energy is checked afresh at every "
            "guided step, rows under the threshold are not moved, and guidance resumes if the energy rises"
        ),
    )
    step_size: Literal["noise_sigma", "has_sigmas"] = Field(
        "noise_sigma",
        description=(
            "guidance's step per unit gradient: sigma_t^2 where the scheduler's initial noise sigma exceeds 1 (Euler), "
            "sqrt(1 - alpha_bar_t) otherwise (DDIM, DPM-Solver, UniPC); 'has_sigmas': sigma_t^2 on every scheduler with "
            "sigmas, the reference's code (models/pipelines.py:60-69), which on today's DPM-Solver steps ~200x further "
            "at step 0 (docs/controller.md, 'Differences')"
        ),
    )
    topk_fraction: float = Field(0.2, gt=0.0, le=1.0, description="k = fraction of the mask's pixels (ref 0.2)")
    background_weight: float = Field(4.0, ge=0.0, description="w: weight of attention outside the box (ref 4)")
    transfer_weight: float = Field(2.0, ge=0.0, description="attention transfer from the per-box pass (§2.6, ref 2.0)")
    energy_checks: bool = Field(
        True,
        description=(
            "measure each pass's energy again after its first and last guided steps (the report's after_first_step "
            "and end): one extra guidance forward each, no effect on the image"
        ),
    )
    attention_layers: list[str] | None = Field(
        None,
        description=(
            "cross-attention modules read by guidance and masks (diffusers module names, e.g. "
            "'mid_block.attentions.0.transformer_blocks.0.attn2'); None: the mid block's and the first "
            "up block-with-attention's cross-attentions, which is the reference's choice on SD 1.x/2.x"
        ),
    )

    # --- per-box pass (§2.3) ----------------------------------------------------------------
    box_noise_ratio: float | None = Field(
        None, ge=0.0, le=1.0,
        description="r: inside the box sqrt(1-r)*bg + sqrt(r)*fg; None: the reference's per variant (0.01 lmd, 0.1 lmd_plus)",
    )
    single_object_negative: str = Field(SINGLE_OBJECT_NEGATIVE_WORDS, description="added to the per-box negative prompt")
    per_box_negative_order: Literal["layout_first", "single_object_first"] = Field(
        "layout_first",
        description=(
            "the per-box negative prompt: the layout's negative, default_negative, then single_object_negative (the "
            "reference's order and string, generation/lmd.py:330-334); 'single_object_first': single_object_negative, "
            "the layout's, default_negative (ours before issue 23)"
        ),
    )
    box_cells: Literal["corner_size", "edges"] = Field(
        "corner_size",
        description=(
            "how a box becomes cells of the attention maps and of the per-box noise region: corner and size rounded "
            "separately (reference, utils/utils.py:57-70); 'edges': corner floored, far edge rounded (ours before issue 23)"
        ),
    )
    placement_rule: Literal["reference", "on_canvas"] = Field(
        "reference",
        description=(
            "details of centred placement: 'reference': a tall box is cut at the canvas's top (utils/utils.py:36-40), "
            "the mask's centre of mass is taken at cell indices (utils/utils.py:102-121) and the shift is not limited "
            "(utils/latents.py:85-105); 'on_canvas' (ours before issue 23): a tall box moves down to stay whole, the "
            "centre of mass is taken at cell centres, and the shift never pushes the mask off the canvas"
        ),
    )
    per_box_full_pass: bool = Field(
        True,
        description=(
            "run the per-box pass to the last step and segment the final per-box image (reference); False: "
            "stop once composition, masks and attention transfer have what they use, and segment the "
            "decoded x0-prediction of that step"
        ),
    )
    per_box_placement: Literal["centred", "in_place"] = Field(
        "centred",
        description=(
            "lmd: generate each object centred (bottom 20% above the canvas's), then move its latents, mask and "
            "attention to its box (reference); 'in_place': generate it in its box. lmd_plus always generates in place, "
            "as the reference does"
        ),
    )
    max_batch: int | None = Field(None, ge=1, description="most samples per UNet call; None: all objects x CFG in one call")
    guidance_checkpointing: bool = Field(
        False,
        description=(
            "gradient checkpointing of guidance's forwards (ours, for memory): each UNet block keeps only its inputs and "
            "is recomputed during the backward, so a guided row holds a fraction of its activations for about one more "
            "partial forward per guidance iteration; the same latents either way (docs/models.md, 'Memory')"
        ),
    )
    conditioning_mode: Literal["replace", "concat", "tokens"] | None = Field(
        None,
        description=(
            "with a conditioning other than clip: replace (guidance on CLIP, denoising on the conditioning's tokens), "
            "concat (ELLA: its tokens before CLIP's for guidance and denoising, phrase indices shifted) or tokens "
            "(per-token connectors: guidance on the connector's own tokens); None: the conditioning's default "
            "(tokens for LI-DiT-style connectors, replace otherwise)"
        ),
    )

    conditioning_negative: Literal["layout", "empty"] | None = Field(
        None,
        description=(
            "what a conditioning other than clip encodes for classifier-free guidance's negative: layout (the layout's "
            "negative prompt, LMD's choice) or empty (the empty string, as ELLA's official pipeline does); CLIP, which "
            "guidance reads, always encodes the layout's. None: the conditioning's default (layout; gluenet: empty)"
        ),
    )

    # --- masks (§2.4) ------------------------------------------------------------------------
    mask_from_step: int = Field(10, ge=0, le=REFERENCE_STEPS, description="aggregate attention from this step on, of 50 (ref 10)")
    masks: MaskOptions = Field(default_factory=MaskOptions, description="SAM refinement and fallbacks (grounded_sd.masks)")

    # --- composition and the final pass (§2.5, §2.6) ----------------------------------------
    frozen_ratio: float = Field(0.5, ge=0.0, le=1.0, description="fraction of steps whose foreground is the composed latent (ref 0.5)")
    plus_frozen_ratio: float | None = Field(
        None, ge=0.0, le=1.0,
        description=(
            "lmd_plus: frozen_ratio for that variant; None: frozen_ratio (the reference uses one frozen_step_ratio for "
            "both, generation/lmd_plus.py:198). The fast preset sets 0.3 (ours): the per-box pass, all of it GLIGEN-"
            "grounded, runs to the frozen point, and in LMD+ GLIGEN keeps placing the objects in the final pass"
        ),
    )
    ratio_steps: Literal["floor", "nearest"] = Field(
        "floor",
        description=(
            "frozen and GLIGEN steps from their ratios: int(ratio * steps) (reference, generation/lmd.py:286, "
            "models/pipelines.py:408); 'nearest': round(ratio * steps) (ours before issue 23)"
        ),
    )
    latent_mask: Literal["centre", "half"] = Field(
        "centre",
        description=(
            "an image mask on the latent grid: a cell counts when the bilinear sample at its centre is non-zero (reference, "
            "models/sam.py:51); 'half': when at least half of it is covered (ours before issue 23)"
        ),
    )
    compose_step0: Literal["mask_box", "mask"] = Field(
        "mask_box",
        description=(
            "where each object's initial noise goes into the final pass's starting latent: its mask's bounding box "
            "grown by one latent cell (reference), or its mask only"
        ),
    )
    phrase_groups: Literal["group", "object"] = Field(
        "group",
        description=(
            "final-pass guidance of identical phrases: one energy term per phrase group over the union of its boxes, "
            "reading its count word too ('two apples'), and attention transfer averaged within the group, then over "
            "groups (reference); 'object': one term per object, count word not read, everything averaged over objects"
        ),
    )

    # --- LMD+ (§2.8) ------------------------------------------------------------------------
    gligen_ratio: float = Field(0.4, ge=0.0, le=1.0, description="fraction of steps with GLIGEN adapters on (lmd_plus)")
    guidance_grounding: Literal["null", "grounded"] = Field(
        "null",
        description=(
            "lmd_plus: GLIGEN grounding in guidance's forwards: 'null' (reference, models/pipelines.py:381-384: the "
            "zeroed presence masks of the unconditional half) or 'grounded' (the conditional row's boxes and phrases, "
            "ours before issue 23)"
        ),
    )
    gligen_phrases: Literal["group", "object"] = Field(
        "group",
        description=(
            "lmd_plus final pass: the GLIGEN phrase of each box of a duplicated object: its group's ('two apples', "
            "reference, generation/lmd_plus.py:463-467) or its own ('an apple', ours before issue 23)"
        ),
    )

    # --- limits ------------------------------------------------------------------------------
    max_objects: int = Field(MAX_OBJECTS, ge=1, le=MAX_OBJECTS, description="more objects than this is an InvalidLayoutError")

    @field_validator("iteration_schedule")
    @classmethod
    def _check_schedule(cls, schedule: list[tuple[int, int]]) -> list[tuple[int, int]]:
        ends = [end for end, _ in schedule]
        if ends != sorted(ends) or any(n < 0 for _, n in schedule):
            raise ValueError("iteration_schedule must be (until_step, iterations) pairs with increasing steps")
        return schedule

    @model_validator(mode="after")
    def _check_layers(self) -> "LMDOptions":
        if self.attention_layers is not None and not self.attention_layers:
            raise ValueError("attention_layers must name at least one layer, or be None for the default")
        return self

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "LMDOptions":
        """The options of the preset called ``name`` (``reference`` or ``fast``) with ``overrides``."""
        presets = {"reference": cls.reference, "fast": cls.fast}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(presets)}")
        return presets[name](**overrides)

    @classmethod
    def reference(cls, **overrides) -> "LMDOptions":
        """docs/method.md's reference defaults (the published implementation's numbers)."""
        return cls(**overrides)

    @classmethod
    def fast(cls, **overrides) -> "LMDOptions":
        """Every stage of the method at under 3x plain SD's work with 3 objects: see docs/controller.md.

        The foreground is frozen for the first 40% of final steps (ref 50%), and the per-box pass
        stops there (later per-box latents are never composed), so masks come from the decoded
        x0-prediction of that step; guidance (and with it attention transfer) takes one iteration
        per step on the first 10 of 50 steps, where the layout is decided (ref: 30 steps, 65
        iterations); the report's extra energy measurements are skipped; the boxes stay as planned
        (not stretched to span the canvas). Under lmd_plus the foreground is frozen for 30% of
        the steps: its per-box pass runs GLIGEN's gated attention on every row, which makes a
        forward 1.5x (SD 1.5's size) to 1.75x (the bench's small model) plain SD's, and GLIGEN
        keeps placing the objects during the first 40% of the final pass (BENCHMARKS.md, "LMD+ fast").
        """
        values = dict(
            frozen_ratio=0.4,
            plus_frozen_ratio=0.3,
            guidance_steps=10,
            iteration_schedule=[(10, 1)],
            per_box_full_pass=False,
            energy_checks=False,
            guidance_stop="step",
            rescale_boxes=False,
        )
        values.update(overrides)
        return cls(**values)

    # --- the schedule at the actual step count -----------------------------------------------
    def scaled(self, reference_step: int) -> int:
        """A step index given on the 50-step scale, at ``self.steps`` steps (as given under
        ``step_schedule="absolute"``)."""
        if self.step_schedule == "absolute":
            return reference_step
        return round(reference_step * self.steps / REFERENCE_STEPS)

    def guided_steps(self) -> int:
        """Guided steps at ``self.steps``; at least one when guidance is on at all, so that very
        short runs (2-4 steps) keep the method's guidance instead of rounding it away."""
        if self.guidance_steps == 0:
            return 0
        return min(self.steps, max(1, self.scaled(self.guidance_steps)))

    def iterations_at(self, step: int) -> int:
        """Guidance iterations at denoising step ``step`` (0 when the step is not guided)."""
        if step >= self.guided_steps():
            return 0
        for until, iterations in self.iteration_schedule:
            if step < max(1, self.scaled(until)):
                return iterations
        return 0

    def _ratio_steps(self, ratio: float) -> int:
        steps = int(ratio * self.steps) if self.ratio_steps == "floor" else round(ratio * self.steps)
        return min(self.steps, steps)

    def frozen_steps(self, plus: bool = False) -> int:
        """Steps whose foreground is the composed latent; ``plus``: for lmd_plus (``plus_frozen_ratio``)."""
        if plus and self.plus_frozen_ratio is not None:
            return self._ratio_steps(self.plus_frozen_ratio)
        return self._ratio_steps(self.frozen_ratio)

    def gligen_steps(self) -> int:
        return self._ratio_steps(self.gligen_ratio)

    def noise_ratio(self, variant: str) -> float:
        """``box_noise_ratio``, or the reference's for ``variant`` when it is None."""
        if self.box_noise_ratio is not None:
            return self.box_noise_ratio
        return REFERENCE_BOX_NOISE_RATIO["lmd_plus" if variant == "lmd_plus" else "lmd"]

    def mask_first_step(self) -> int:
        return min(self.steps - 1, self.scaled(self.mask_from_step))
