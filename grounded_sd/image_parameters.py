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

from PIL import PngImagePlugin
from pydantic import BaseModel, Field, ValidationError

from grounded_sd.errors import NoImageParameters
from grounded_sd.lora import LoraUse
from layout_planner.layout import Layout

CHUNK_PREFIX = "lmd:"
JSON_FIELDS = ("layout", "conditioning", "loras")


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
    loras: list[LoraUse] = Field(default_factory=list, description="the LoRA adapters (name and weight) the UNet ran with")
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


# What a reader of the parameters takes from a file, whoever wrote it (``lmd info`` and the
# studio's PNG drop share these rules, docs/studio.md): only uncompressed tEXt/iTXt chunks named
# lmd:* (LMD writes no other kind, so no compressed text is ever inflated), each at most
# MAX_TEXT_CHUNK_BYTES and all together MAX_TEXT_BYTES, in a file of at most MAX_CHUNKS chunks;
# JSON fields nested at most MAX_JSON_DEPTH deep. Pixels are never decoded.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_CHUNK_BYTES = 256 * 1024
MAX_TEXT_BYTES = 1024 * 1024
MAX_CHUNKS = 10_000
MAX_JSON_DEPTH = 16


def read_text_chunks(path: Path | str, prefix: str = CHUNK_PREFIX) -> dict[str, str]:
    """The uncompressed tEXt/iTXt chunks of a PNG whose keyword starts with ``prefix``, within the
    bounds above; the image data is skipped, not read. :class:`NoImageParameters` (one line) for
    a file that is not a PNG, is cut short, or breaks a bound."""
    fields: dict[str, str] = {}
    total = 0
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                raise NoImageParameters(f"{path}: cannot read it as an image: not a PNG file")
            for _ in range(MAX_CHUNKS):
                head = f.read(8)
                if len(head) < 8:
                    raise NoImageParameters(f"{path}: the PNG is cut short (no IEND chunk)")
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"IEND":
                    return fields
                if kind not in (b"tEXt", b"iTXt"):
                    f.seek(length + 4, 1)  # the data and its CRC, unread
                    continue
                keyword = f.read(min(length, 80)).split(b"\0", 1)[0]  # a PNG keyword is 1-79 bytes
                if not keyword.decode("latin-1").startswith(prefix):
                    f.seek(length - min(length, 80) + 4, 1)
                    continue
                if length > MAX_TEXT_CHUNK_BYTES or total + length > MAX_TEXT_BYTES:
                    raise NoImageParameters(f"{path}: a text chunk is larger than the {MAX_TEXT_CHUNK_BYTES // 1024} KiB "
                                            f"(or all of them than the {MAX_TEXT_BYTES // 1024} KiB) LMD ever writes")
                total += length
                f.seek(-min(length, 80), 1)
                data = f.read(length)
                if len(data) < length:
                    raise NoImageParameters(f"{path}: the PNG is cut short (in a text chunk)")
                f.seek(4, 1)
                name, text = _text_chunk(kind, data)
                if text is not None:
                    fields[name] = text
    except OSError as exc:
        raise NoImageParameters(f"{path}: cannot read it: {exc.strerror or type(exc).__name__}") from None
    raise NoImageParameters(f"{path}: the PNG has more than {MAX_CHUNKS} chunks; LMD writes a few dozen")


def _text_chunk(kind: bytes, data: bytes) -> tuple[str, str | None]:
    """(keyword, text) of a tEXt or iTXt chunk; text None for a compressed iTXt (never inflated)."""
    keyword, _, rest = data.partition(b"\0")
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if rest[:1] != b"\0":  # compression flag set
        return name, None
    _language, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return name, text.decode("utf-8", "replace")


def json_depth(text: str) -> int:
    """How deeply ``[`` and ``{`` nest in a JSON text (strings skipped): checked before parsing."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_parameters(path: Path | str) -> ImageParameters:
    """The parameters a PNG carries; :class:`NoImageParameters` (one line) when it has none, they
    do not parse, or the file breaks a bound of :func:`read_text_chunks`."""
    chunks = read_text_chunks(path)
    fields = {k.removeprefix(CHUNK_PREFIX): v for k, v in chunks.items()}
    if not fields:
        raise NoImageParameters(f"{path} carries no lmd generation parameters (no 'lmd:*' text chunks)")
    try:
        for name in JSON_FIELDS:
            if name in fields:
                if json_depth(fields[name]) > MAX_JSON_DEPTH:
                    raise NoImageParameters(f"{path}: its lmd:{name} is nested deeper than {MAX_JSON_DEPTH} levels")
                fields[name] = json.loads(fields[name])
        return ImageParameters.model_validate(fields)
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise NoImageParameters(f"{path}: its lmd parameters do not parse: {first}") from None
