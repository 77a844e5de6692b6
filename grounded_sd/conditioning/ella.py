"""ELLA (Hu et al. 2024): a T5 encoder and a Timestep-Aware Semantic Connector (TSC).

The connector turns the T5 features of a prompt into 64 tokens in SD 1.x's 768-d
cross-attention space, differently at every timestep: learned queries, shifted by the
timestep's embedding, attend to the T5 features through six perceiver blocks whose layer norms
are modulated by the timestep. Attribute names follow the released
``ella-sd1.5-tsc-t5xl.safetensors`` so that a strict load of it works (93 tensors, 66.8 M
parameters at the default :class:`ELLAConfig`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from grounded_sd.conditioning.base import ClipEmbeddings, Conditioned, Conditioning, Mode, Negative, PromptTokensConditioned, TextInputs
from grounded_sd.conditioning.checkpoints import load_module, read_safetensors
from grounded_sd.conditioning.encoders import TextEncoder, load_text_encoder
from grounded_sd.errors import CheckpointMismatch, ConditioningUnavailable


@dataclass(frozen=True)
class ELLAConfig:
    """Sizes of the connector; the defaults are the released SD 1.5 checkpoint's."""

    time_channels: int = 320
    time_embed_dim: int = 768
    width: int = 768
    text_dim: int = 2048  # FLAN-T5-XL's d_model
    num_latents: int = 64
    layers: int = 6
    heads: int = 8
    max_period: float = 10000.0

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "ELLAConfig":
        """Sizes read from a checkpoint's shapes (heads cannot be read: the released 8), so
        smaller connectors of the same structure load too; key names are still checked strictly."""
        try:
            num_latents, width = state["connector.latents"].shape
            time_embed_dim, time_channels = state["time_embedding.linear_1.weight"].shape
            text_dim = state["connector.proj_in.weight"].shape[1]
        except (KeyError, ValueError) as exc:
            raise CheckpointMismatch(f"not an ELLA connector checkpoint: no usable {exc}") from exc
        layers = len({key.split(".")[2] for key in state if key.startswith("connector.perceiver_blocks.")})
        return cls(int(time_channels), int(time_embed_dim), int(width), int(text_dim), int(num_latents), layers)


def timestep_features(timesteps: torch.Tensor, channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``timesteps`` (B,) -> (B, channels): cosines first, then sines
    (diffusers' ``flip_sin_to_cos=True`` with frequency shift 0)."""
    half = channels // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class TimestepNorm(nn.Module):
    """LayerNorm without affine weights, then ``* (1 + scale) + shift`` from the timestep.

    The modulation layer starts at zero, as in the official ``AdaLayerNorm``
    (TencentQQGYLab/ELLA, ``model.py``): a fresh block is a plain LayerNorm at every timestep,
    and training learns how the timestep should modulate it (DiT's adaLN-Zero idea)."""

    def __init__(self, width: int, time_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(nn.functional.silu(temb)).view(x.shape[0], 1, -1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class PerceiverBlock(nn.Module):
    """Queries attend to [themselves, the text]; then a squared-ReLU MLP; both residual."""

    def __init__(self, width: int, heads: int, time_dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("sq_relu", SquaredReLU()), ("c_proj", nn.Linear(4 * width, width))])
        )
        self.ln_1 = TimestepNorm(width, time_dim)
        self.ln_2 = TimestepNorm(width, time_dim)
        self.ln_ff = TimestepNorm(width, time_dim)

    def forward(self, text: torch.Tensor, queries: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(queries, temb)
        keys = torch.cat([normed, self.ln_2(text, temb)], dim=1)
        queries = queries + self.attn(normed, keys, keys, need_weights=False)[0]
        return queries + self.mlp(self.ln_ff(queries, temb))


class Connector(nn.Module):
    def __init__(self, config: ELLAConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.num_latents, config.width) * config.width**-0.5)
        self.time_aware_linear = nn.Linear(config.time_embed_dim, config.width)
        self.proj_in = nn.Linear(config.text_dim, config.width)
        self.perceiver_blocks = nn.ModuleList(
            PerceiverBlock(config.width, config.heads, config.time_embed_dim) for _ in range(config.layers)
        )

    def forward(self, text: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        queries = self.latents[None].expand(text.shape[0], -1, -1) + self.time_aware_linear(nn.functional.silu(temb))
        text = self.proj_in(text)
        for block in self.perceiver_blocks:
            queries = block(text, queries, temb)
        return queries


class ELLA(nn.Module):
    """``ELLA(config)(text_features (B, L, text_dim), timestep) -> (B, num_latents, width)``."""

    def __init__(self, config: ELLAConfig | None = None) -> None:
        super().__init__()
        self.config = config or ELLAConfig()
        self.time_embedding = TimeEmbedding(self.config.time_channels, self.config.time_embed_dim)
        self.connector = Connector(self.config)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor | int | float) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=text.device).reshape(-1)
        features = timestep_features(t, self.config.time_channels, self.config.max_period).to(text.dtype)
        temb = self.time_embedding(features)[:, None].expand(text.shape[0], -1, -1)  # (B, 1, dim)
        return self.connector(text, temb)

    @classmethod
    def from_file(cls, source: str | Path, *, config: ELLAConfig | None = None, setting: str = "ella checkpoint") -> "ELLA":
        """Strictly load a ``.safetensors`` connector (local path or ``owner/repo/file``)."""
        return load_module(lambda state: cls(config or ELLAConfig.from_state(state)), source, setting, read_safetensors)


class ELLAConditioned(PromptTokensConditioned):
    def __init__(self, owner: "ELLAConditioning", texts: TextInputs, clip: ClipEmbeddings, mode: Mode) -> None:
        super().__init__(clip, mode, texts)
        self.owner = owner
        self._features: dict[str, list[torch.Tensor]] = {}
        self.connector_calls = 0  # connector runs over a pass's prompts (tests count them)

    @property
    def token_offset(self) -> int:
        return self.owner.ella.config.num_latents if self.mode == "concat" else 0

    def _tokens(self, key: str, timestep) -> torch.Tensor:
        """T5 features once per generation (each prompt at its own length, as the reference
        does); the connector once per call of this (once per pass and step)."""
        if key not in self._features:
            dtype = next(self.owner.ella.parameters()).dtype
            self._features[key] = [self.owner.encoder.encode([p]).to(dtype) for p in self.prompts[key]]
        self.connector_calls += 1
        config = self.owner.ella.config
        rows = [self.owner.ella(features, timestep) for features in self._features[key]]
        return torch.cat(rows) if rows else torch.zeros(0, config.num_latents, config.width)


class ELLAConditioning(Conditioning):
    """T5 features, once per generation; the connector, once per pass and timestep."""

    name = "ella"
    modes = ("replace", "concat")
    negatives = ("layout", "empty")  # empty: the official pipeline's T5 + ELLA of "" (docs/conditioning.md)

    def __init__(self, ella: ELLA, encoder: TextEncoder, *, negative: Negative = "layout") -> None:
        self.negatives = (negative, "empty" if negative == "layout" else "layout")  # the first is the default
        self.ella = ella.eval().requires_grad_(False)
        self.encoder = encoder
        if encoder.dim != ella.config.text_dim:
            raise ConditioningUnavailable(
                f"ella: the text encoder makes {encoder.dim}-d features; the connector takes {ella.config.text_dim}-d"
            )

    @property
    def output_dim(self) -> int:
        return self.ella.config.width

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        encoder: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: ELLAConfig | None = None,
        checkpoint_setting: str = "LMD_ELLA_CHECKPOINT",
        encoder_setting: str = "LMD_ELLA_T5",
        negative: Negative = "layout",
    ) -> "ELLAConditioning":
        """The connector from ``checkpoint`` and a T5 encoder (hub id or directory). On CUDA
        the T5 encoder runs in fp16 (fp32/bf16 T5 features visibly change ELLA's images)."""
        device = torch.device(device)
        text_dtype = torch.float16 if device.type == "cuda" else torch.float32
        text_encoder = load_text_encoder(encoder, kind="t5", device=device, dtype=text_dtype, setting=encoder_setting)
        ella = ELLA.from_file(checkpoint, config=config, setting=checkpoint_setting).to(device, dtype)
        return cls(ella, text_encoder, negative=negative)

    def check_unet(self, unet) -> None:
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ConditioningUnavailable("ella has weights for SD 1.x only; the loaded UNet is an SDXL-style UNet")
        super().check_unet(unet)

    def prepare(self, texts: TextInputs, clip: ClipEmbeddings, *, mode: Mode = "replace") -> Conditioned:
        self.check_mode(mode)
        return ELLAConditioned(self, texts, clip, mode)
