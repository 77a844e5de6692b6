"""Generation parameters stored in the PNG itself, as Stable Diffusion web UIs do.

Every PNG that :meth:`GenerationResult.save` writes (image, overlay, masks) carries one
international text chunk (iTXt, UTF-8) per field of :class:`ImageParameters`, named
``lmd:<field>``: plain text for strings and numbers, JSON for the layout and the
conditioning. An image therefore restores its own settings and layout
(:func:`read_parameters`, ``lmd info image.png``, or the studio page), even after its
``layout.json`` and ``report.json`` are gone.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError

from grounded_sd.errors import NoImageParameters
from layout_planner.layout import Layout

CHUNK_PREFIX = "lmd:"
JSON_FIELDS = ("layout", "conditioning")


def project_version() -> str:
    try:
        return metadata.version("lmd-service")
    except metadata.PackageNotFoundError:
        return "unknown"


class Conditioning(BaseModel):
    """What the UNet was conditioned on: the text conditioning (docs/conditioning.md) and the texts
    built from the layout by ``grounded_sd.prompts``."""

    name: str = Field("clip", description="clip, ella or gluenet")
    mode: str = Field("replace", description="how it combines with CLIP (docs/conditioning.md)")
    negative: str = Field("layout", description="what it encoded as the negative: layout (the layout's negative prompt) or empty")
    language: str | None = Field(None, description="the language GlueNet read the prompt in")
    prompt: str = Field(description="the scene prompt of the final pass")
    negative_prompt: str = Field(description="the negative prompt: the layout's, the request's and the preset's")
    per_box_prompts: dict[str, str] = Field(default_factory=dict, description="object id -> its per-box pass prompt")


class ImageParameters(BaseModel):
    """Everything needed to render the image again."""

    prompt: str = Field(description="the request's prompt (or the phrases joined when a layout was given)")
    layout: Layout
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    variant: str
    preset: str = Field(description="the option preset the steps and schedule came from ('custom' when unknown)")
    model: str
    scheduler: str
    negative_prompt: str | None = Field(None, description="the request's extra negative prompt")
    conditioning: Conditioning
    refiner: str | None = Field(None, description="the SDXL refiner that finished the image (grounded_sd.refiner); None: none")
    refiner_strength: float | None = Field(None, description="the refiner pass's strength")
    version: str = Field(default_factory=project_version, description="lmd-service version that wrote it")

    def png_info(self) -> PngImagePlugin.PngInfo:
        info = PngImagePlugin.PngInfo()
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            text = json.dumps(value, ensure_ascii=False) if name in JSON_FIELDS else str(value)
            info.add_itxt(CHUNK_PREFIX + name, text)
        info.add_text("Software", f"lmd-service {self.version}")
        return info


def read_parameters(path: Path | str) -> ImageParameters:
    """The parameters a PNG carries; :class:`NoImageParameters` when it has none or they do not parse."""
    try:
        with Image.open(path) as image:
            image.load()
            chunks = dict(getattr(image, "text", {}) or {})
    except (OSError, UnidentifiedImageError) as exc:
        raise NoImageParameters(f"{path}: cannot read it as an image: {exc}") from exc
    fields = {k.removeprefix(CHUNK_PREFIX): v for k, v in chunks.items() if k.startswith(CHUNK_PREFIX)}
    if not fields:
        raise NoImageParameters(f"{path} carries no lmd generation parameters (no 'lmd:*' text chunks)")
    try:
        for name in JSON_FIELDS:
            if name in fields:
                fields[name] = json.loads(fields[name])
        return ImageParameters.model_validate(fields)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise NoImageParameters(f"{path}: its lmd parameters do not parse: {str(exc).splitlines()[0]}") from exc
