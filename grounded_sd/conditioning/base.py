"""The conditioning interface: which ``encoder_hidden_states`` the UNet denoises with.

LMD's guidance reads a phrase's cross-attention at that phrase's CLIP token positions, so the
controller always encodes its prompts with the model's own CLIP text encoder. A conditioning
decides what the *denoising* forwards see instead (the classifier-free guided noise
prediction of every step), per pass and per timestep:

- ``clip`` (the default): the CLIP embeddings themselves, today's behaviour.
- ``ella``: a T5 encoder and ELLA's timestep-aware connector (64 tokens per prompt).
- ``gluenet``: XLM-RoBERTa and GlueGen's GlueNet, for a prompt in another language.

Two ways to combine a conditioning with guidance:

- ``replace`` (the default; "option A"): guidance runs its forward/backward on CLIP (phrase
  token indices unchanged) while the denoising forwards use the conditioning's tokens.
- ``concat``: the conditioning's tokens are put before CLIP's, and guidance and denoising
  both use the concatenation; phrase indices shift by :attr:`Conditioned.token_offset`.
- ``tokens`` (per-token connectors trained with ``lmd train-connector``): no CLIP at all;
  guidance reads each phrase on the connector's own tokens, found from the phrase's
  characters (:meth:`Conditioned.guidance_tokens`).

A :class:`Conditioning` is loaded once per process and reused; :meth:`Conditioning.prepare`
runs its text encoders once per generation; :meth:`Conditioned.denoising` computes what
depends on the timestep once per step (the result is reused by every forward of the step).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from grounded_sd.errors import ConditioningUnavailable
Pass = Literal["per_box", "final"]
"""``per_box``: one row per object; ``final``: the scene prompt (also the ``sd`` baseline)."""
Mode = Literal["replace", "concat", "tokens"]
Negative = Literal["layout", "empty"]
"""What a conditioning encodes for classifier-free guidance's negative: ``layout`` (the layout's
negative prompt, LMD's choice) or ``empty`` (the empty string, as ELLA's official pipeline does)."""


@dataclass(frozen=True)
class TextInputs:
    """The texts of one generation, as the controller builds them from the layout."""

    scene_prompt: str
    box_prompts: tuple[str, ...]
    negative_prompt: str
    box_negative_prompt: str
    source_prompt: str | None = None
    """The user's own words before stage 1 (any language); GlueNet denoises the final pass with it."""
    language: str | None = None
    """ISO 639-1 code of ``source_prompt`` (GlueNet picks its checkpoint by it)."""


@dataclass(frozen=True)
class ClipEmbeddings:
    """The model's own CLIP embeddings of :class:`TextInputs` (what guidance reads)."""

    scene: torch.Tensor  # (1, 77, D)
    negative: torch.Tensor  # (1, 77, D)
    boxes: torch.Tensor  # (N, 77, D), N may be 0
    box_negative: torch.Tensor  # (1, 77, D)
    pooled: "ClipEmbeddings | None" = None
    """SDXL: the same four texts' pooled embeddings (the second text encoder's ``text_embeds``,
    2-D), which every UNet call adds to its time embedding; None for SD 1.x/2.x."""

    def pair(self, which: Pass) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.boxes, self.box_negative) if which == "per_box" else (self.scene, self.negative)

    def pooled_pair(self, which: Pass) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cond, uncond) pooled embeddings of ``which`` (SDXL), or None."""
        return self.pooled.pair(which) if self.pooled is not None else None


class Conditioned(ABC):
    """One generation's conditioning, from :meth:`Conditioning.prepare`."""

    def __init__(self, clip: ClipEmbeddings, mode: Mode = "replace") -> None:
        self.clip = clip
        self.mode = mode
        self.notes: list[str] = []  # what the report should say about this conditioning
        self.language: str | None = None  # the language the conditioning read the prompt in, if it reads one
        self._step: dict[Pass, tuple[object, tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def token_offset(self) -> int:
        """Positions before CLIP's first token in what guidance reads (concat mode)."""
        return 0

    def denoising(self, which: Pass, timestep: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) the denoising forwards of ``which`` use at ``timestep``: cond has one
        row per prompt of the pass, uncond one row. Computed once per (pass, timestep)."""
        key = float(timestep)
        cached = self._step.get(which)
        if cached is None or cached[0] != key:
            cached = (key, self._compute(which, timestep))
            self._step[which] = cached
        return cached[1]

    def guidance_tokens(self, which: Pass, row: int, clip_indices: tuple[int, ...], span: tuple[int, int]) -> tuple[int, ...]:
        """Positions guidance reads for a phrase: ``prompt[span[0]:span[1]]`` of prompt ``row`` of
        ``which`` (the scene prompt, or box prompt ``row``), whose CLIP positions are
        ``clip_indices``. Default: the CLIP positions, shifted by :attr:`token_offset`."""
        return tuple(i + self.token_offset for i in clip_indices)

    def guidance(self, which: Pass, timestep: torch.Tensor | int) -> torch.Tensor:
        """The cond embeddings guidance's forward uses: CLIP (replace), or the same
        concatenation the denoising uses (concat)."""
        if self.mode == "concat":
            return self.denoising(which, timestep)[0]
        return self.clip.pair(which)[0]

    def denoises_with_guidance_embeddings(self, which: Pass, timestep: torch.Tensor | int) -> bool:
        """True when the denoising forward attends to what guidance reads (clip, concat,
        GlueNet's per-box pass), so phrase attention maps can be taken from it; False when a
        CLIP-conditioned forward must be run for them (replace mode)."""
        return self.guidance(which, timestep) is self.denoising(which, timestep)[0]

    @abstractmethod
    def _compute(self, which: Pass, timestep: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) of ``which`` at ``timestep`` (called once per pass and step)."""


class PromptTokensConditioned(Conditioned):
    """Conditioned by tokens a model makes from each prompt set (ELLA, trained connectors):
    :meth:`_tokens` gives one row per prompt of a set at a timestep; ``concat`` puts them
    before CLIP's."""

    def __init__(self, clip: ClipEmbeddings, mode: Mode, texts: TextInputs) -> None:
        super().__init__(clip, mode)
        self.prompts: dict[str, list[str]] = {
            "final": [texts.scene_prompt],
            "final_negative": [texts.negative_prompt],
            "per_box": list(texts.box_prompts),
            "per_box_negative": [texts.box_negative_prompt],
        }

    @abstractmethod
    def _tokens(self, key: str, timestep) -> torch.Tensor:
        """(len(self.prompts[key]), tokens, width) at ``timestep``."""

    def _compute(self, which: Pass, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cond, uncond = self._tokens(which, timestep), self._tokens(f"{which}_negative", timestep)
        clip_cond, clip_uncond = self.clip.pair(which)
        cond, uncond = cond.to(clip_cond.device, clip_cond.dtype), uncond.to(clip_cond.device, clip_cond.dtype)
        if self.mode == "concat":
            return concat_tokens(cond, clip_cond), concat_tokens(uncond, clip_uncond)
        return cond, uncond


class Conditioning(ABC):
    """A text conditioning, loaded once and reused by every generation."""

    name: ClassVar[str]
    modes: ClassVar[tuple[Mode, ...]] = ("replace",)
    negatives: ClassVar[tuple[Negative, ...]] = ("layout",)
    """What it can encode as the negative; the first is its default."""

    def check_unet(self, unet) -> None:
        """Raise :class:`ConditioningUnavailable` when the UNet is not the kind this
        conditioning was trained for. Default: the output width must match."""
        width = self.output_dim
        if width is not None and unet.config.cross_attention_dim != width:
            raise ConditioningUnavailable(
                f"{self.name} makes {width}-d tokens for SD 1.x UNets; the loaded UNet's cross_attention_dim is "
                f"{unet.config.cross_attention_dim}"
            )

    @property
    def output_dim(self) -> int | None:
        return None

    @property
    def default_mode(self) -> Mode:
        """The mode used when the caller names none."""
        return self.modes[0]

    def check_mode(self, mode: Mode) -> None:
        if mode not in self.modes:
            raise ConditioningUnavailable(f"conditioning {self.name} supports mode {' or '.join(self.modes)}, not {mode!r}")

    def check_negative(self, negative: Negative) -> None:
        if negative not in self.negatives:
            raise ConditioningUnavailable(
                f"conditioning {self.name} encodes the negative as {' or '.join(self.negatives)}, not {negative!r}"
            )

    @abstractmethod
    def prepare(self, texts: TextInputs, clip: ClipEmbeddings, *, mode: Mode = "replace") -> Conditioned:
        """Run the text encoders once for one generation."""


class ClipConditioned(Conditioned):
    def _compute(self, which: Pass, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.pair(which)


class ClipConditioning(Conditioning):
    """Today's behaviour: SD's own CLIP embeddings denoise and guide."""

    name = "clip"

    def prepare(self, texts: TextInputs, clip: ClipEmbeddings, *, mode: Mode = "replace") -> Conditioned:
        self.check_mode(mode)
        return ClipConditioned(clip, mode)


def guidance_targets(conditioned: "Conditioned", which: Pass, targets: list, rows: list[int], spans: list[tuple[int, int]]) -> list:
    """Energy targets with the positions guidance reads (:meth:`Conditioned.guidance_tokens`):
    target ``k`` is the phrase ``spans[k]`` (characters) of prompt ``rows[k]`` of ``which``."""
    return [
        dataclasses.replace(t, token_indices=conditioned.guidance_tokens(which, row, t.token_indices, span))
        for t, row, span in zip(targets, rows, spans)
    ]


def concat_tokens(extra: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """``extra`` tokens before ``clip`` tokens, rows broadcast (one uncond row against N)."""
    rows = max(extra.shape[0], clip.shape[0])
    return torch.cat([extra.expand(rows, -1, -1), clip.to(extra.dtype).expand(rows, -1, -1)], dim=1)

