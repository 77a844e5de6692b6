"""``connector:PATH``: a connector trained with ``lmd train-connector`` as a conditioning.

The language models run once per generation (each prompt set: scene, boxes, negatives); the
connector runs once per pass and timestep. Modes:

- ``tokens`` (the default for LI-DiT-style connectors): the connector's tokens denoise *and* guide.
  A phrase's guidance positions are the connector tokens whose characters overlap the phrase
  in the prompt (each language model's tokens, when two are fused). Guidance then steers the
  very attention the denoiser uses, with no second text encoder.
- ``replace`` (the default, and the only per-token-free choice, for ELLA connectors): guidance
  on SD's CLIP tokens, denoising on the connector's.
- ``concat``: the connector's tokens before CLIP's; guidance on the concatenation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grounded_sd.conditioning.base import ClipEmbeddings, Conditioned, Conditioning, Mode, Pass, PromptTokensConditioned, TextInputs
from grounded_sd.conditioning.llm import EncodedText
from grounded_sd.conditioning.trained import TrainedConnector, phrase_tokens
from grounded_sd.errors import ConditioningUnavailable

PREFIX = "connector:"


class ConnectorConditioned(PromptTokensConditioned):
    def __init__(self, owner: "ConnectorConditioning", texts: TextInputs, clip: ClipEmbeddings, mode: Mode) -> None:
        super().__init__(clip, mode, texts)
        self.owner = owner
        self._encoded: dict[str, list[EncodedText]] = {}

    @property
    def token_offset(self) -> int:
        return self.owner.connector.output_tokens if self.mode == "concat" else 0

    def _encode(self, key: str) -> list[EncodedText]:
        if key not in self._encoded:
            dtype = next(self.owner.connector.module.parameters()).dtype
            self._encoded[key] = [part.to(part.features.device, dtype) for part in self.owner.connector.encode(self.prompts[key])]
        return self._encoded[key]

    def _tokens(self, key: str, timestep) -> torch.Tensor:
        if not self.prompts[key]:
            return torch.zeros(0, self.owner.connector.output_tokens, self.owner.connector.spec.cross_attention_dim)
        return self.owner.connector(self._encode(key), timestep).hidden_states

    def guidance(self, which: Pass, timestep: torch.Tensor | int) -> torch.Tensor:
        if self.mode == "tokens":
            return self.denoising(which, timestep)[0]
        return super().guidance(which, timestep)

    def guidance_tokens(self, which: Pass, row: int, clip_indices: tuple[int, ...], span: tuple[int, int]) -> tuple[int, ...]:
        if self.mode != "tokens":
            return super().guidance_tokens(which, row, clip_indices, span)
        return phrase_tokens(self._encode(which), row, *span)


class ConnectorConditioning(Conditioning):
    """A trained connector (``lmd train-connector``'s export) with its language models."""

    name = "connector"
    negatives = ("layout", "empty")

    def __init__(self, connector: TrainedConnector, source: str | Path | None = None) -> None:
        self.connector = connector
        if source is not None:
            self.name = f"{PREFIX}{source}"  # what reports and job records show
        self.modes = ("tokens", "replace", "concat") if connector.spec.per_token else ("replace", "concat")
        if connector.spec.per_token and connector.spec.guidance == "clip":
            self.modes = ("replace", "tokens", "concat")

    @classmethod
    def from_path(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "ConnectorConditioning":
        return cls(TrainedConnector.load(path, device=device, dtype=dtype), path)

    @property
    def output_dim(self) -> int:
        return self.connector.spec.cross_attention_dim

    def check_unet(self, unet) -> None:
        sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if sdxl != (self.connector.spec.pooled_dim is not None):
            made = "an SDXL" if self.connector.spec.pooled_dim is not None else "an SD 1.x/2.x"
            raise ConditioningUnavailable(f"connector was trained for {made} UNet ({self.connector.spec.base_model}); the loaded UNet is not one")
        super().check_unet(unet)

    def prepare(self, texts: TextInputs, clip: ClipEmbeddings, *, mode: Mode | None = None) -> Conditioned:
        mode = mode or self.default_mode
        self.check_mode(mode)
        return ConnectorConditioned(self, texts, clip, mode)
