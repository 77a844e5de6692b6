"""A connector trained with ``lmd train-connector``: its file format and its runtime.

An exported connector is a directory with ``connector.json`` (a :class:`ConnectorSpec`: kind,
sizes, the language models and how they are read) and ``connector.safetensors`` (the
weights). :class:`TrainedConnector` is the runtime both training and generation use: frozen
language models, then the trainable connector module, which maps their features and the
diffusion timestep to the UNet's ``encoder_hidden_states`` (and SDXL's pooled embedding).

Two kinds:

- ``lidit``: LI-DiT-style token refiner(s) (:mod:`grounded_sd.conditioning.lidit`): one output
  token per prompt token, so guidance can read each phrase on the connector's own tokens.
- ``ella``: ELLA's timestep-aware connector (:class:`grounded_sd.conditioning.ella.ELLA`),
  64 learned queries; its keys follow the released checkpoint, so an SD 1.x export loads with
  ``ELLA.from_file`` too. For SDXL a ``pooled_projection`` is added.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from grounded_sd.conditioning.lidit import ConnectorOutput, LiDiTConnector, RefinerSize, masked_mean
from grounded_sd.conditioning.llm import EncodedText, EncoderSpec, LLMTextEncoder
from grounded_sd.errors import ConnectorError

CONNECTOR_FORMAT = "lmd-connector/1"
SPEC_FILE = "connector.json"
WEIGHTS_FILE = "connector.safetensors"
ConnectorKind = Literal["lidit", "ella"]


class ELLASize(BaseModel):
    """Sizes of a trainable ELLA connector (the width is the UNet's cross-attention width)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(6, ge=1, le=32, description="perceiver blocks (released: 6)")
    heads: int = Field(8, ge=1, description="attention heads (released: 8)")
    latents: int = Field(64, ge=1, le=1024, description="learned queries = output tokens (released: 64)")


class ConnectorSpec(BaseModel):
    """``connector.json``: everything needed to rebuild a connector and its text encoders."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["lmd-connector/1"] = CONNECTOR_FORMAT
    kind: ConnectorKind
    encoders: list[EncoderSpec] = Field(min_length=1, max_length=2)
    in_dims: list[int] = Field(description="hidden size of each language model's chosen layer")
    cross_attention_dim: int
    pooled_dim: int | None = Field(None, description="SDXL: width of the pooled text embedding the UNet adds to its time embedding")
    refiner: RefinerSize | None = Field(None, description="sizes of a lidit connector (absent for ella)")
    ella: ELLASize | None = Field(None, description="sizes of an ella connector (absent for lidit)")
    guidance: Literal["tokens", "clip"] = Field(
        "tokens", description="tokens: guidance reads each phrase on the connector's own tokens (lidit only); clip: on SD's CLIP tokens"
    )
    base_model: str | None = None
    steps: int = 0

    def check(self) -> "ConnectorSpec":
        if len(self.in_dims) != len(self.encoders):
            raise ConnectorError(f"connector.json: {len(self.encoders)} encoders but {len(self.in_dims)} in_dims")
        if self.kind == "ella" and len(self.encoders) != 1:
            raise ConnectorError("an ella connector takes exactly one text encoder (a T5)")
        if self.kind == "ella" and self.guidance == "tokens":
            raise ConnectorError("an ella connector's 64 queries have no token correspondence: use guidance 'clip'")
        return self

    @property
    def per_token(self) -> bool:
        return self.kind == "lidit"

    @property
    def refiner_size(self) -> RefinerSize:
        return self.refiner or RefinerSize()

    @property
    def ella_size(self) -> ELLASize:
        return self.ella or ELLASize()

    def portable(self, directory: Path) -> "ConnectorSpec":
        """This spec as an export in ``directory`` writes it: the trained kind's sizes only, and
        local model directories relative to ``directory`` (``./`` or ``../``), so the file holds
        no absolute path of the training machine and still loads where the models sit alike."""
        return self.model_copy(update={
            "encoders": [e.model_copy(update={"model": relative_source(e.model, directory)}) for e in self.encoders],
            "base_model": relative_source(self.base_model, directory) if self.base_model else None,
            "refiner": self.refiner_size if self.kind == "lidit" else None,
            "ella": self.ella_size if self.kind == "ella" else None,
        })


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def relative_source(source: str, directory: Path) -> str:
    """A hub id unchanged; a local path relative to ``directory``, always starting with ``.``
    (which no hub id does)."""
    if not _is_local(source):
        return source
    relative = os.path.relpath(Path(source).expanduser().resolve(), Path(directory).resolve())
    return relative if relative.startswith("..") else f"./{relative}"


def resolve_source(source: str, directory: Path) -> str:
    """The inverse of :func:`relative_source`: a ``./`` or ``../`` path is read from ``directory``."""
    if source.startswith(("./", "../")) or source in {".", ".."}:
        return str((Path(directory) / source).resolve())
    return source


def _ella_class():
    from grounded_sd.conditioning.ella import ELLA, ELLAConfig

    class ELLAConnector(ELLA):
        """ELLA with the released key names, plus a pooled projection for SDXL."""

        def __init__(self, config: ELLAConfig, pooled_dim: int | None) -> None:
            super().__init__(config)
            self.pooled_projection = nn.Linear(config.width, pooled_dim) if pooled_dim else None

        def set_gradient_checkpointing(self, enabled: bool = True) -> None:  # six small blocks: not worth it
            pass

        def forward(self, features: list[torch.Tensor], masks: list[torch.Tensor], n_instruction: list[int], timesteps: torch.Tensor) -> ConnectorOutput:
            dtype = self.connector.latents.dtype
            hidden = super().forward(features[0].to(dtype), timesteps)
            pooled = self.pooled_projection(hidden.mean(dim=1)) if self.pooled_projection is not None else None
            return ConnectorOutput(hidden, pooled)

    return ELLAConnector, ELLAConfig


def build_module(spec: ConnectorSpec) -> nn.Module:
    """The connector module of ``spec`` with fresh weights (zero-initialised gates for lidit)."""
    spec.check()
    if spec.kind == "lidit":
        return LiDiTConnector(spec.in_dims, spec.cross_attention_dim, spec.refiner_size, spec.pooled_dim)
    cls, config_cls = _ella_class()
    width = spec.cross_attention_dim
    size = spec.ella_size
    if width % size.heads:
        raise ConnectorError(f"ella: the UNet's cross-attention width {width} is not divisible by {size.heads} heads")
    config = config_cls(time_embed_dim=width, width=width, text_dim=spec.in_dims[0], num_latents=size.latents, layers=size.layers, heads=size.heads)
    return cls(config, spec.pooled_dim)


def read_spec(path: str | Path) -> ConnectorSpec:
    directory = Path(path).expanduser()
    spec_file = directory / SPEC_FILE
    if not spec_file.is_file():
        raise ConnectorError(f"{directory} is not an exported connector: {SPEC_FILE} is missing")
    try:
        return ConnectorSpec.model_validate_json(spec_file.read_text(encoding="utf-8")).check()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConnectorError(f"{spec_file}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def save_connector(directory: str | Path, spec: ConnectorSpec, module: nn.Module) -> Path:
    """Write ``connector.json`` (:meth:`ConnectorSpec.portable`) and ``connector.safetensors``
    (fp32, contiguous) to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = spec.portable(directory)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": CONNECTOR_FORMAT})
    (directory / SPEC_FILE).write_text(spec.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")
    return directory


def check_export(directory: str | Path, spec: ConnectorSpec | None = None) -> ConnectorSpec:
    """The spec of an exported connector (``spec``, else its connector.json) whose weights file
    is there; nothing loaded yet."""
    directory = Path(directory).expanduser()
    spec = spec or read_spec(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise ConnectorError(f"{directory} is not an exported connector: {WEIGHTS_FILE} is missing")
    return spec


def load_module(directory: str | Path, spec: ConnectorSpec | None = None) -> tuple[ConnectorSpec, nn.Module]:
    """The spec and the module with the exported weights (strict: every key, same shapes)."""
    from grounded_sd.conditioning.checkpoints import load_strict, read_safetensors

    directory = Path(directory).expanduser()
    spec = check_export(directory, spec)
    weights = directory / WEIGHTS_FILE
    module = build_module(spec)
    load_strict(module, read_safetensors(weights), weights, setting=f"connector:{directory}")
    return spec, module


@dataclass
class TrainedConnector:
    """Frozen language models + a connector module: prompts and timesteps -> UNet conditioning."""

    spec: ConnectorSpec
    module: nn.Module
    encoders: list[LLMTextEncoder]

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "TrainedConnector":
        spec, module = load_module(directory)
        directory = Path(directory).expanduser()
        encoders = [LLMTextEncoder.load(e.model_copy(update={"model": resolve_source(e.model, directory)}), device=device) for e in spec.encoders]
        for encoder, dim in zip(encoders, spec.in_dims):
            if encoder.hidden_size != dim:
                raise ConnectorError(f"text encoder {encoder.spec.model!r} makes {encoder.hidden_size}-d features; the connector takes {dim}-d")
        return cls(spec, module.to(device, dtype).eval().requires_grad_(False), encoders)

    @property
    def output_tokens(self) -> int:
        if self.spec.kind == "ella":
            return self.spec.ella_size.latents
        return sum(e.max_tokens for e in self.spec.encoders)

    def encode(self, prompts: list[str]) -> list[EncodedText]:
        """Each language model's features of ``prompts`` (run once per prompt set)."""
        return [encoder.encode(prompts) for encoder in self.encoders]

    def __call__(self, encoded: list[EncodedText], timesteps: torch.Tensor | int | float) -> ConnectorOutput:
        return run_connector(self.module, encoded, timesteps)

    def phrase_tokens(self, encoded: list[EncodedText], row: int, start: int, end: int) -> tuple[int, ...]:
        """Output-token positions of ``prompt[start:end]`` of ``row`` (lidit only): each language
        model's prompt tokens that overlap the span, offset by the models before it."""
        return phrase_tokens(encoded, row, start, end)


def phrase_tokens(encoded: list[EncodedText], row: int, start: int, end: int) -> tuple[int, ...]:
    positions: list[int] = []
    offset = 0
    for part in encoded:
        positions += [offset + i for i in part.tokens_for_span(row, start, end)]
        offset += part.max_tokens
    return tuple(positions)


def run_connector(module: nn.Module, encoded: list[EncodedText], timesteps: torch.Tensor | int | float) -> ConnectorOutput:
    """The module on encoded text; ``timesteps`` a scalar or one per row."""
    features = [e.features for e in encoded]
    t = torch.as_tensor(timesteps, device=features[0].device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(features[0].shape[0])
    return module(features, [e.mask for e in encoded], [e.n_instruction for e in encoded], t)


__all__ = [
    "CONNECTOR_FORMAT",
    "ConnectorOutput",
    "ConnectorSpec",
    "ELLASize",
    "TrainedConnector",
    "build_module",
    "load_module",
    "masked_mean",
    "phrase_tokens",
    "read_spec",
    "run_connector",
    "save_connector",
]
