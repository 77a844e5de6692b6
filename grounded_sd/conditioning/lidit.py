"""An LI-DiT-style connector: a token refiner per language model, optionally a collaborative
refiner that fuses two of them, and a projection to the UNet's cross-attention width.

"LI-DiT-style": the design follows the parts of LI-DiT (Ma et al. 2024, "Exploring the Role of
Large Language Models in Prompt Encoding for Diffusion Models", arXiv 2406.11831) that its
abstract and Figure 5 state, but it is trained as ELLA's connector is, against a frozen SD
UNet, where LI-DiT trains its refiners with a DiT from scratch; none of LI-DiT's results are
claimed for it. Each choice and its source (docs/training.md, "Where each choice comes from"):

- the refiner drops the LLM's causal mask (bidirectional attention) to remove the positional
  bias of decoder-only features: LI-DiT, abstract and Figure 5 ("linguistic token refiner");
- one collaborative block that mixes two LLMs' refined streams: LI-DiT, Figure 5
  ("collaborative refiner"); its form, one gated cross-attention per stream, is our choice (the
  parts of the paper we could read give no equations for it);
- the refiner's conditioning vector, timestep embedding + a projection of the masked mean of
  the text features, and 2 blocks: HunyuanVideo's token refiner (arXiv 2412.03603; code
  ``hyvideo/modules/token_refiner.py``), itself a refiner of this kind;
- gates *and* shifts and scales from that vector, through a zero-initialised layer, so an
  untrained refiner is the identity: DiT's adaLN-Zero (Peebles & Xie 2023, §3.2); HunyuanVideo
  modulates gates only. Ours, so training starts from the LLM's own features;
- one output token per prompt token (instruction tokens dropped): our choice, so a phrase's
  characters map to output tokens and LMD's guidance can read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint


class RefinerSize(BaseModel):
    """Sizes of the token refiner (stored in an exported connector)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: int = Field(2, ge=0, le=32, description="bidirectional refiner blocks per language model (HunyuanVideo's refiner: 2)")
    width: int | None = Field(None, ge=8, description="refiner width; default the language model's hidden size (no input projection)")
    heads: int | None = Field(None, ge=1, description="attention heads; default width // 64 (at least 1)")
    mlp_ratio: float = Field(4.0, gt=0, le=16)
    cond_dim: int = Field(256, ge=8, description="width of the timestep + pooled-text conditioning vector")
    fuse: bool = Field(True, description="with two language models: one collaborative (cross-attention) refiner block")


def timestep_features(timesteps: torch.Tensor, channels: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the (0..1000) diffusion timestep, cos first."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _Attention(nn.Module):
    """Multi-head attention with a key padding mask; bidirectional (no causal mask)."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"refiner width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(kv_width or width, width)
        self.to_v = nn.Linear(kv_width or width, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        bias = torch.zeros(context_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~context_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])
        return self.to_out(out.transpose(1, 2).reshape(b, n, w))


class RefinerBlock(nn.Module):
    """One bidirectional block: self-attention and MLP, each ``x += gate * f(modulated LN(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, h, mask)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class TokenRefiner(nn.Module):
    """A token refiner over one language model's features (B, L, in_dim) -> (B, L, width)."""

    def __init__(self, in_dim: int, size: RefinerSize) -> None:
        super().__init__()
        width = size.width or in_dim
        heads = size.heads or max(1, width // 64)
        self.proj_in = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.blocks = nn.ModuleList(RefinerBlock(width, heads, size.mlp_ratio, size.cond_dim) for _ in range(size.blocks))
        self.width = width
        self.gradient_checkpointing = False

    def forward(self, features: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, cond, use_reentrant=False)
            else:
                x = block(x, mask, cond)
        return x


class CollaborativeBlock(nn.Module):
    """A collaborative refiner (LI-DiT, Figure 5): each stream cross-attends to the other once,
    gated from zero (the form is our choice)."""

    def __init__(self, width: int, heads: int, cond_dim: int, streams: int = 2) -> None:
        super().__init__()
        self.norms_q = nn.ModuleList(nn.LayerNorm(width, elementwise_affine=False, eps=1e-6) for _ in range(streams))
        self.norms_kv = nn.ModuleList(nn.LayerNorm(width, eps=1e-6) for _ in range(streams))
        self.attn = nn.ModuleList(_Attention(width, heads) for _ in range(streams))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * width * streams))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, streams: list[torch.Tensor], masks: list[torch.Tensor], cond: torch.Tensor) -> list[torch.Tensor]:
        mods = self.modulation(cond).chunk(3 * len(streams), dim=-1)
        out = []
        for i, x in enumerate(streams):
            others = [j for j in range(len(streams)) if j != i]
            context = torch.cat([self.norms_kv[j](streams[j]) for j in others], dim=1)
            context_mask = torch.cat([masks[j] for j in others], dim=1)
            shift, scale, gate = mods[3 * i : 3 * i + 3]
            out.append(x + gate[:, None] * self.attn[i](_modulate(self.norms_q[i](x), shift, scale), context, context_mask))
        return out


@dataclass
class ConnectorOutput:
    """What the UNet is conditioned with: the token sequence and, for SDXL, the pooled embedding."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None


class LiDiTConnector(nn.Module):
    """Token refiners (one per language model), an optional collaborative block, projections to
    ``cross_attention_dim``; instruction tokens dropped, the streams concatenated along tokens.

    Inputs per language model: features (B, n_instruction + max_tokens, D_i), mask, and the
    instruction length. The conditioning vector of every block is
    ``MLP(timestep features) + Linear(mean of the valid input features)``, summed over models."""

    def __init__(self, in_dims: list[int], cross_attention_dim: int, size: RefinerSize, pooled_dim: int | None = None) -> None:
        super().__init__()
        if not 1 <= len(in_dims) <= 2:
            raise ValueError(f"an LI-DiT-style connector takes one or two language models, got {len(in_dims)}")
        self.size = size
        self.time_embedding = nn.Sequential(nn.Linear(256, size.cond_dim), nn.SiLU(), nn.Linear(size.cond_dim, size.cond_dim))
        self.pooled_text = nn.ModuleList(nn.Linear(d, size.cond_dim) for d in in_dims)
        self.refiners = nn.ModuleList(TokenRefiner(d, size) for d in in_dims)
        self.norms_out = nn.ModuleList(nn.LayerNorm(r.width) for r in self.refiners)
        self.projections = nn.ModuleList(nn.Linear(r.width, cross_attention_dim) for r in self.refiners)
        heads = max(1, cross_attention_dim // 64)
        while cross_attention_dim % heads:
            heads -= 1
        self.collaborative = CollaborativeBlock(cross_attention_dim, heads, size.cond_dim, len(in_dims)) if len(in_dims) == 2 and size.fuse else None
        self.pooled_projection = nn.Linear(cross_attention_dim, pooled_dim) if pooled_dim else None

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for refiner in self.refiners:
            refiner.gradient_checkpointing = enabled

    def conditioning(self, features: list[torch.Tensor], masks: list[torch.Tensor], timesteps: torch.Tensor) -> torch.Tensor:
        dtype = self.time_embedding[0].weight.dtype
        cond = self.time_embedding(timestep_features(timesteps).to(dtype))
        for proj, x, m in zip(self.pooled_text, features, masks):
            cond = cond + proj(masked_mean(x.to(dtype), m))
        return cond

    def refine(self, features: list[torch.Tensor], masks: list[torch.Tensor], cond: torch.Tensor) -> list[torch.Tensor]:
        """The refiners' outputs (instruction included) at each model's refiner width."""
        dtype = self.time_embedding[0].weight.dtype
        return [refiner(x.to(dtype), m, cond) for refiner, x, m in zip(self.refiners, features, masks)]

    def forward(
        self, features: list[torch.Tensor], masks: list[torch.Tensor], n_instruction: list[int], timesteps: torch.Tensor
    ) -> ConnectorOutput:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(features[0].shape[0])
        cond = self.conditioning(features, masks, timesteps)
        refined = self.refine(features, masks, cond)
        streams = [proj(norm(x)) for proj, norm, x in zip(self.projections, self.norms_out, refined)]
        if self.collaborative is not None:
            streams = self.collaborative(streams, masks, cond)
        kept = [x[:, n:] for x, n in zip(streams, n_instruction)]  # drop the instruction's tokens
        kept_masks = [m[:, n:] for m, n in zip(masks, n_instruction)]
        hidden = torch.cat(kept, dim=1)
        pooled = None
        if self.pooled_projection is not None:
            pooled = self.pooled_projection(masked_mean(hidden, torch.cat(kept_masks, dim=1)))
        return ConnectorOutput(hidden, pooled)
