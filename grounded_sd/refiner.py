"""The optional SDXL refiner pass (docs/method.md §2.8): image-to-image at a low strength after the
final pass, as the reference can finish its images.

The refiner is a separate model (``stabilityai/stable-diffusion-xl-refiner-1.0`` or a local
diffusers directory of that shape), loaded once and reused like the main pipeline. It sees the
whole finished image and the scene prompt: it sharpens detail and never moves objects (at
strength 0.3 it redoes the last 30% of its schedule), so the layout, the masks and the report's
per-object numbers stay those of the grounded generation.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from grounded_sd.errors import GenerationCanceled
from grounded_sd.report import GenerationResult, RefinerReport
from layout_planner.draw import draw_layout

REFINER_NEGATIVE = "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly"
"""The reference's negative prompt for the refiner (SDXL drifts toward painted styles otherwise)."""


class RefinerOptions(BaseModel):
    """How the refiner pass runs; defaults are the reference's (strength from its ``--sdxl-step-ratio``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strength: float = Field(0.3, gt=0.0, le=1.0, description="fraction of the refiner's schedule redone (ref 0.3)")
    steps: int = Field(50, ge=1, le=1000, description="the refiner's schedule length; it runs strength x steps of them")
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0, description="CFG scale of the refiner (diffusers' default, as the reference)")
    negative: Literal["layout", "scene"] = Field(
        "layout",
        description=(
            "the refiner's negative prompt: the layout's negative, then REFINER_NEGATIVE (the reference's, "
            "generation/sdxl_refinement.py:27); 'scene': the generation's whole negative prompt (with the default "
            "negative words), then REFINER_NEGATIVE (ours before issue 23)"
        ),
    )
    resolution: int | None = Field(
        1024,
        ge=64,
        description="the image's long side is resized (Lanczos) to this before refining, rounded to a multiple of 8 "
        "(ref 1024, SDXL's native size); the refined image keeps this size. None: refine at the generation's size",
    )


def refiner_negative(result: GenerationResult, source: str = "layout") -> str:
    """The refiner's negative prompt (:attr:`RefinerOptions.negative`)."""
    first = result.layout.negative if source == "layout" else result.report.negative_prompt
    return ", ".join(part.strip() for part in (first, REFINER_NEGATIVE) if part and part.strip())


def refiner_seed(seed: int) -> int:
    """The refiner's noise seed from the job seed (distinct from every other seed of the job)."""
    digest = hashlib.sha256(f"lmd-refiner:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class Refiner:
    """A loaded SDXL refiner; ``refine(result, ...)`` returns the result with the refined image."""

    def __init__(self, pipe, name: str = "refiner") -> None:
        self.pipe = pipe
        self.name = name

    @classmethod
    def from_pretrained(cls, model: str | Path, *, device: str = "auto", dtype: str = "auto") -> "Refiner":
        """Load ``StableDiffusionXLImg2ImgPipeline`` from a hub id or a local directory;
        ``ModelLoadError`` for a missing directory or a model of another shape."""
        from diffusers import StableDiffusionXLImg2ImgPipeline

        from grounded_sd.errors import ModelLoadError
        from grounded_sd.pipeline import resolve_device, resolve_dtype

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = str(model)
        local = Path(source).expanduser()
        if local.exists():
            if not (local / "model_index.json").is_file():
                raise ModelLoadError(f"{local} is not a diffusers SDXL refiner directory: missing model_index.json")
            source = str(local)
        elif source.startswith((".", "/", "~")):
            raise ModelLoadError(f"refiner model directory not found: {local}")
        try:
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(source, torch_dtype=torch_dtype)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"cannot load the SDXL refiner {source!r}: {exc}".splitlines()[0]) from exc
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
            raise ModelLoadError(f"{source!r} is not an SDXL refiner (expected text_encoder_2 and a text_time UNet)")
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(torch_device), name=source)

    def refine(
        self,
        result: GenerationResult,
        *,
        options: RefinerOptions | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Refine ``result.image`` with its scene prompt and negative prompt (plus the refiner's
        negative), redraw the overlay, and record the pass in ``result.report.refiner``.
        ``progress("refine", step, total)`` after every step; ``should_cancel`` before each."""
        options = options or RefinerOptions()
        started = time.perf_counter()
        report = result.report
        image = result.image
        if options.resolution is not None:
            scale = options.resolution / max(image.size)
            size = tuple(max(8, round(side * scale / 8) * 8) for side in image.size)
            if size != image.size:
                image = image.resize(size, Image.LANCZOS)
        negative = refiner_negative(result, options.negative)
        total = max(1, int(options.steps * options.strength))
        seed = refiner_seed(report.seed)

        def on_step_end(pipe, step: int, timestep, kwargs: dict) -> dict:
            if progress is not None:
                progress("refine", step + 1, total)
            if should_cancel is not None and should_cancel():
                raise GenerationCanceled("generation canceled")
            return kwargs

        if should_cancel is not None and should_cancel():
            raise GenerationCanceled("generation canceled")
        refined = self.pipe(
            prompt=report.prompt, negative_prompt=negative, image=image, strength=options.strength,
            num_inference_steps=options.steps, guidance_scale=options.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step_end,
        ).images[0]
        result.image = refined
        result.overlay = draw_layout(result.layout, refined)
        report.refiner = RefinerReport(
            model=self.name, strength=options.strength, steps=total, guidance_scale=options.guidance_scale, seed=seed,
            width=refined.size[0], height=refined.size[1], negative_prompt=negative, wall_s=time.perf_counter() - started,
        )
        report.wall_s += report.refiner.wall_s
        return result
