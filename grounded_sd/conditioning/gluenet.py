"""GlueGen's GlueNet (Qin et al. 2023): XLM-RoBERTa features mapped into SD 1.x's CLIP space.

One checkpoint per language (the released ones: zh, fr, it, ja, es), each a 50.2 M parameter
MLP-mixer: five residual blocks that mix across channels (``net_sen``) and across the 77 token
positions (``net_tok``), then a ``tail`` without layer norms that maps 1024 -> 768 channels.
Its input is XLM-R-large's last hidden state divided by 3; its output is multiplied by a fixed
per-position norm / 2 (the released values, :data:`OUTPUT_NORMS`) and used as SD's prompt
embeddings. Attribute names follow the released ``gluenet_*_clip_overnorm_over3_noln.ckpt``.

Because ``net_tok`` mixes positions, GlueNet's tokens do not line up with the prompt's words:
LMD's guidance cannot read a phrase's attention from them, so guidance stays on CLIP of the
English phrases and GlueNet conditions the final pass's denoising with the user's prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from grounded_sd.conditioning.base import ClipEmbeddings, Conditioned, Conditioning, Mode, Pass, TextInputs
from grounded_sd.conditioning.checkpoints import load_module, read_tensor_pickle
from grounded_sd.conditioning.encoders import XLMR_TOKENS, TextEncoder, load_text_encoder
from grounded_sd.errors import CheckpointMismatch, ConditioningUnavailable

INPUT_DIVISOR = 3.0
"""XLM-R's last hidden state is divided by this before GlueNet (as in training)."""

OUTPUT_NORMS = (
    43.8203, 28.3668, 27.9345, 28.0084, 28.2958, 28.2576, 28.3373, 28.2695, 28.4097, 28.2790, 28.2825,
    28.2807, 28.2775, 28.2708, 28.2682, 28.2624, 28.2589, 28.2611, 28.2616, 28.2639, 28.2613, 28.2566,
    28.2615, 28.2665, 28.2799, 28.2885, 28.2852, 28.2863, 28.2780, 28.2818, 28.2764, 28.2532, 28.2412,
    28.2336, 28.2514, 28.2734, 28.2763, 28.2977, 28.2971, 28.2948, 28.2818, 28.2676, 28.2831, 28.2890,
    28.2979, 28.2999, 28.3117, 28.3363, 28.3554, 28.3626, 28.3589, 28.3597, 28.3543, 28.3660, 28.3731,
    28.3717, 28.3812, 28.3753, 28.3810, 28.3777, 28.3693, 28.3713, 28.3670, 28.3691, 28.3679, 28.3624,
    28.3703, 28.3703, 28.3720, 28.3594, 28.3576, 28.3562, 28.3438, 28.3376, 28.3389, 28.3433, 28.3191,
)
"""Per-position norms of SD 1.x's CLIP embeddings at the 77 positions; GlueNet's output is
multiplied by these / 2 (GlueGen's "overnorm" normalisation). The first position is CLIP's
start token, which has a much larger norm than the rest."""

LANGUAGE_NAMES = {"zh": "Chinese", "fr": "French", "it": "Italian", "ja": "Japanese", "es": "Spanish"}
"""The languages of the released checkpoints (``gluenet_{Name}_clip_overnorm_over3_noln.ckpt``)."""


@dataclass(frozen=True)
class GlueNetConfig:
    """Sizes; the defaults are the released multilingual checkpoints'."""

    tokens: int = XLMR_TOKENS
    in_dim: int = 1024  # XLM-R-large
    out_dim: int = 768  # SD 1.x's CLIP
    mult: int = 2
    depth: int = 5

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "GlueNetConfig":
        """Sizes read from a checkpoint's shapes, so smaller GlueNets of the same structure load
        too; key names are still checked strictly."""
        try:
            hidden, tokens = state["blocks.0.net_tok.0.weight"].shape
            wide, in_dim = state["blocks.0.net_sen.0.weight"].shape
            out_dim = state["tail.net_sen.4.weight"].shape[0]
        except (KeyError, ValueError) as exc:
            raise CheckpointMismatch(f"not a GlueNet checkpoint: no usable {exc}") from exc
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        return cls(int(tokens), int(in_dim), int(out_dim), int(wide) // int(in_dim), depth)


def _mlp(sizes: tuple[int, int, int, int], norm: bool) -> nn.Sequential:
    """Linear-(LayerNorm)-GELU-Linear-(LayerNorm)-GELU-Linear-(LayerNorm), numbered as the
    released files number them (with norms: linears 0, 3, 6 and norms 1, 4, 7; without: 0, 2, 4)."""
    layers: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(("linear", nn.Linear(a, b)))
        if norm:
            layers.append(("norm", nn.LayerNorm(b)))
        if i < 2:
            layers.append(("act", nn.GELU()))
    return nn.Sequential(OrderedDict((str(index), module) for index, (_, module) in enumerate(layers)))


class MixerBlock(nn.Module):
    """``net_sen`` across channels and ``net_tok`` across positions; residual when the width
    is kept (the blocks), plain when it changes (the tail)."""

    def __init__(self, tokens: int, dim_in: int, dim_out: int, mult: int, norm: bool) -> None:
        super().__init__()
        self.residual = dim_in == dim_out
        self.net_tok = _mlp((tokens, tokens * mult, tokens * mult, tokens), norm)
        self.net_sen = _mlp((dim_in, dim_in * mult, dim_in * mult, dim_out), norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, tokens, dim)
        if self.residual:
            x = self.net_sen(x) + x
            x = x.transpose(1, 2)
            return (self.net_tok(x) + x).transpose(1, 2)
        return self.net_tok(self.net_sen(x).transpose(1, 2)).transpose(1, 2)


class GlueNet(nn.Module):
    """``GlueNet(config)(xlmr_last_hidden_state (B, 77, in_dim)) -> (B, 77, out_dim)`` in SD's
    prompt-embedding scale (input scaling and output norms included)."""

    def __init__(self, config: GlueNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or GlueNetConfig()
        c = self.config
        self.blocks = nn.ModuleList(MixerBlock(c.tokens, c.in_dim, c.in_dim, c.mult, norm=True) for _ in range(c.depth))
        self.tail = MixerBlock(c.tokens, c.in_dim, c.out_dim, c.mult, norm=False)
        norms = torch.tensor(OUTPUT_NORMS if c.tokens == len(OUTPUT_NORMS) else (1.0,) * c.tokens)
        self.register_buffer("output_scale", norms[:, None] / 2, persistent=False)  # not in the checkpoints

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden / INPUT_DIVISOR
        for block in self.blocks:
            x = nn.functional.gelu(block(x) + x)
        return self.tail(x) * self.output_scale.to(x.dtype)

    @classmethod
    def from_file(cls, source: str | Path, *, config: GlueNetConfig | None = None, setting: str = "gluenet checkpoint") -> "GlueNet":
        """Strictly load a released (``torch.save``d state dict) checkpoint, tensors only."""
        return load_module(lambda state: cls(config or GlueNetConfig.from_state(state)), source, setting, read_tensor_pickle)


class GlueNetConditioned(Conditioned):
    def __init__(self, clip: ClipEmbeddings, native: torch.Tensor, native_negative: torch.Tensor) -> None:
        super().__init__(clip, "replace")
        self.native, self.native_negative = native, native_negative

    def _compute(self, which: Pass, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        if which == "per_box":  # the per-box prompts exist in English only: CLIP denoises them
            return self.clip.pair(which)
        return self.native, self.native_negative


class GlueNetConditioning(Conditioning):
    """XLM-R-large (shared) and one GlueNet per configured language, each loaded on first use."""

    name = "gluenet"
    negatives = ("empty",)  # GlueNet of "" (the reference); the layout's negative is not used by the final pass

    def __init__(
        self,
        encoder: TextEncoder,
        checkpoints: dict[str, str | Path],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: GlueNetConfig | None = None,
        setting: str = "LMD_GLUENET_CHECKPOINTS",
    ) -> None:
        self.encoder = encoder
        self.checkpoints = {key.lower(): value for key, value in checkpoints.items()}
        self.device, self.dtype = torch.device(device), dtype
        self.config = config
        self.setting = setting
        self.loaded: dict[str, GlueNet] = {}

    @classmethod
    def from_pretrained(
        cls,
        checkpoints: dict[str, str | Path],
        encoder: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: GlueNetConfig | None = None,
        checkpoints_setting: str = "LMD_GLUENET_CHECKPOINTS",
        encoder_setting: str = "LMD_GLUENET_XLMR",
    ) -> "GlueNetConditioning":
        if not checkpoints:
            message = f"gluenet needs at least one per-language checkpoint: set {checkpoints_setting}"
            raise ConditioningUnavailable(message, public=message)  # a setting's name, no value
        device = torch.device(device)
        encoder_model = load_text_encoder(encoder, kind="xlmr", device=device, dtype=dtype, setting=encoder_setting)
        return cls(encoder_model, checkpoints, device=device, dtype=dtype, config=config, setting=checkpoints_setting)

    @property
    def output_dim(self) -> int | None:
        return self.config.out_dim if self.config else None  # else checked per checkpoint in prepare()

    @property
    def languages(self) -> list[str]:
        return sorted(self.checkpoints)

    def translator(self, language: str) -> GlueNet:
        """The GlueNet of ``language``, loaded and checked on first use."""
        if language not in self.checkpoints:
            configured = ", ".join(self.languages) or "none"
            raise ConditioningUnavailable(
                f"gluenet has no checkpoint for language {language!r} (configured: {configured}; set {self.setting})",
                public=f"gluenet has no checkpoint for the prompt's language {language!r} (this service has: {configured})",
            )
        if language not in self.loaded:
            module = GlueNet.from_file(self.checkpoints[language], config=self.config, setting=f"{self.setting}[{language}]")
            if module.config.in_dim != self.encoder.dim:
                raise ConditioningUnavailable(
                    f"{self.setting}[{language}]: GlueNet takes {module.config.in_dim}-d features; the XLM-R encoder makes {self.encoder.dim}-d"
                )
            self.loaded[language] = module.to(self.device, self.dtype).eval().requires_grad_(False)
        return self.loaded[language]

    def prepare(self, texts: TextInputs, clip: ClipEmbeddings, *, mode: Mode = "replace") -> Conditioned:
        from layout_planner.language import detect_language, normalize_language

        self.check_mode(mode)
        if not texts.source_prompt:
            message = ("gluenet denoises with the user's prompt in its own language; this generation has none "
                       "(a layout was given without the prompt it came from)")
            raise ConditioningUnavailable(message, public=message)
        try:
            language = normalize_language(texts.language) if texts.language else detect_language(texts.source_prompt)
        except ValueError as exc:
            raise ConditioningUnavailable(f"gluenet: {exc}", public="gluenet could not tell the prompt's language; "
                                          "name it with language") from exc
        translator = self.translator(language)
        if translator.config.out_dim != clip.scene.shape[-1]:
            raise ConditioningUnavailable(
                f"gluenet makes {translator.config.out_dim}-d tokens for SD 1.x UNets; the loaded UNet takes {clip.scene.shape[-1]}-d"
            )
        with torch.no_grad():
            hidden = self.encoder.encode([texts.source_prompt, ""]).to(self.dtype)
            native, native_negative = translator(hidden).to(clip.scene.device, clip.scene.dtype).chunk(2)
        conditioned = GlueNetConditioned(clip, native, native_negative)
        conditioned.language = language
        conditioned.notes.append(
            f"gluenet ({language}): the final pass denoised with the prompt in its own language and GlueNet's empty-prompt "
            "negative; guidance and the per-box pass used CLIP of the English layout"
        )
        return conditioned
