"""What a generation returns: the images, the masks, and a typed report of what happened."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from pydantic import BaseModel, Field

from grounded_sd.counters import UNetCalls
from grounded_sd.lora import LoraUse
from layout_planner.layout import Layout, mask_file_name
from layout_planner.rescale import BoxRescale

if TYPE_CHECKING:
    from grounded_sd.image_parameters import ImageParameters


class PassEnergy(BaseModel):
    """Energy (§2.1) of one object in one pass (None where the pass had no guidance).

    ``start`` and ``after_first_step`` are measured on the same timestep, before and after the
    first guided step's updates: the direct effect of guidance. ``end`` is after the last guided
    step (a later timestep)."""

    start: float | None = None
    after_first_step: float | None = None
    end: float | None = None
    iterations: int = Field(0, description="guidance iterations run in this pass (all objects together)")


class ObjectReport(BaseModel):
    id: str
    phrase: str
    box: tuple[float, float, float, float]
    token_count: int = Field(0, description="tokens of the phrase that guidance reads (0: truncated away)")
    mask_source: str | None = Field(None, description="sam | attention | box; None without a per-box pass")
    mask_detail: str = ""
    mask_area: float | None = Field(None, description="fraction of the image covered by the mask")
    mask_box_iou: float | None = Field(None, description="IoU of the mask and the object's box")
    per_box_box: tuple[float, float, float, float] | None = Field(
        None, description="where the per-box pass generated the object (centred, or its layout box); a box taller than 0.8 centred by the reference's rule starts above the canvas (y0 < 0)"
    )
    placement_shift: tuple[float, float] | None = Field(
        None, description="(dx, dy) in image fractions by which the object's latents, mask and maps moved to its box"
    )
    per_box_energy: PassEnergy = Field(default_factory=PassEnergy)
    final_energy: PassEnergy = Field(default_factory=PassEnergy)


class StageReport(BaseModel):
    name: str
    wall_s: float
    steps: int
    unet: UNetCalls


class RefinerReport(BaseModel):
    """What the refiner pass did (``report.json``'s ``refiner``)."""

    model: str
    strength: float
    steps: int = Field(description="refiner steps actually run (strength x schedule)")
    guidance_scale: float
    seed: int
    width: int
    height: int
    negative_prompt: str
    wall_s: float


class GenerationReport(BaseModel):
    variant: str
    seed: int
    width: int
    height: int
    steps: int
    per_box_steps: int = Field(0, description="steps run by the per-box pass (fewer than steps with per_box_full_pass off)")
    prompt: str
    negative_prompt: str
    per_box_prompts: dict[str, str] = Field(default_factory=dict)
    conditioning: str = Field("clip", description="what the denoising forwards were conditioned on (docs/conditioning.md)")
    conditioning_mode: str = Field("replace", description="replace: guidance on CLIP, denoising on the conditioning; concat: both on [its tokens, CLIP]; tokens: both on a per-token connector's tokens")
    conditioning_negative: str = Field(
        "layout", description="what the conditioning encoded as the negative: layout (the layout's negative prompt) or empty (\"\", as ELLA's official pipeline)"
    )
    source_prompt: str | None = Field(None, description="the user's own prompt (GlueNet denoises the final pass with it)")
    language: str | None = Field(None, description="the language GlueNet read the source prompt in")
    attention_layers: list[str] = Field(default_factory=list)
    model_type: str = Field("sd", description="sd (SD 1.x/2.x) or sdxl (two text encoders, pooled embeddings and time ids in every UNet call)")
    energy_threshold: float | None = Field(
        None, description="the guidance stop threshold used: loss_threshold x (mean heads of the guided layers) / 8"
    )
    time_ids: list[int] | None = Field(
        None, description="SDXL: the size/crop conditioning of every UNet call (original h, w; crop top, left; target h, w)"
    )
    objects: list[ObjectReport] = Field(default_factory=list)
    box_rescale: BoxRescale | None = Field(
        None, description="how the layout's boxes were stretched to span the canvas (options.rescale_boxes); None: they were not"
    )
    stages: list[StageReport] = Field(default_factory=list)
    unet_total: UNetCalls = Field(default_factory=UNetCalls)
    wall_s: float = 0.0
    device: str = ""
    dtype: str = ""
    model: str = Field("", description="the hub id or directory the model was loaded from")
    loras: list[LoraUse] = Field(default_factory=list, description="the LoRA adapters active in every UNet call, with their weights")
    scheduler: str = Field("", description="the diffusers scheduler class")
    notes: list[str] = Field(default_factory=list)
    options: dict = Field(default_factory=dict)
    refiner: RefinerReport | None = Field(None, description="the SDXL refiner pass, when one ran (grounded_sd.refiner)")


@dataclass
class Intermediates:
    """Tensors kept for inspection and tests (CPU, float32).

    ``per_box_latents`` (per_box_steps+1, N, C, h, w) in ``object_ids`` order;
    ``composed`` (frozen_steps+1, 1, C, h, w) and ``owner`` (h, w) from composition;
    ``final_latents`` (steps+1, 1, C, h, w); ``attention`` object id -> aggregated (h, w) map;
    ``per_box_images`` object id -> decoded per-box image, only when the call asked for them
    (``per_box_images=True``).
    """

    object_ids: list[str] = field(default_factory=list)
    per_box_latents: torch.Tensor | None = None
    per_box_images: dict[str, Image.Image] = field(default_factory=dict)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)
    latent_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    composed: torch.Tensor | None = None
    owner: torch.Tensor | None = None
    final_latents: torch.Tensor | None = None


@dataclass
class GenerationResult:
    image: Image.Image
    overlay: Image.Image
    masks: dict[str, Image.Image]
    layout: Layout
    report: GenerationReport
    intermediates: Intermediates = field(default_factory=Intermediates)

    def parameters(self, *, prompt: str | None = None, preset: str | None = None,
                   negative_prompt: str | None = None) -> "ImageParameters":
        """The PNG parameters of this result; the caller adds what the pipeline cannot know (the
        request's prompt, the preset's name, the request's extra negative prompt)."""
        from grounded_sd.image_parameters import Conditioning, ImageParameters

        report = self.report
        return ImageParameters(
            prompt=prompt if prompt is not None else "; ".join(self.layout.phrases()),
            layout=self.layout, seed=report.seed, steps=report.steps,
            guidance_scale=float(report.options.get("guidance_scale", 0.0)),
            width=report.width, height=report.height, variant=report.variant, preset=preset or "custom",
            model=report.model, scheduler=report.scheduler, negative_prompt=negative_prompt,
            conditioning=Conditioning(name=report.conditioning, mode=report.conditioning_mode, negative=report.conditioning_negative,
                                      language=report.language,
                                      prompt=report.prompt, negative_prompt=report.negative_prompt,
                                      per_box_prompts=report.per_box_prompts),
            refiner=report.refiner.model if report.refiner else None,
            refiner_strength=report.refiner.strength if report.refiner else None,
            loras=[lora.model_copy() for lora in report.loras],
        )

    def save(self, out_dir: Path | str, parameters: "ImageParameters | None" = None) -> Path:
        """Write image.png, overlay.png, masks/<id>.png (each PNG carrying ``parameters``, by
        default :meth:`parameters`), layout.json and report.json."""
        out = Path(out_dir)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        info = (parameters or self.parameters()).png_info()
        self.image.save(out / "image.png", pnginfo=info)
        self.overlay.save(out / "overlay.png", pnginfo=info)
        for object_id, mask in self.masks.items():
            mask.save(out / "masks" / mask_file_name(object_id), pnginfo=info)
        (out / "layout.json").write_text(self.layout.model_dump_json(indent=2))
        (out / "report.json").write_text(json.dumps(self.report.model_dump(mode="json"), indent=2))
        return out
