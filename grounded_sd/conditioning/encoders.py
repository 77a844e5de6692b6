"""The frozen text encoders behind the conditionings: T5 (ELLA) and XLM-RoBERTa (GlueNet).

Each is a transformers encoder with its tokenizer, from a hub id or a local directory. They
differ in how prompts are tokenized, as each method was trained:

- ``t5``: one prompt at a time at its own length (no padding), as ELLA's reference runs it.
- ``xlmr``: padded/truncated to exactly 77 tokens with the attention mask (GlueNet mixes
  across those 77 positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from grounded_sd.errors import ConditioningUnavailable

EncoderKind = Literal["t5", "xlmr"]
XLMR_TOKENS = 77


@dataclass
class TextEncoder:
    kind: EncoderKind
    model: torch.nn.Module
    tokenizer: object
    calls: int = 0  # encoder runs (tests check the native prompt reaches it)
    last_texts: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model if self.kind == "t5" else self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Last hidden states (B, L, dim) of ``texts``."""
        if self.kind == "t5":
            tokens = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        else:
            tokens = self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=XLMR_TOKENS)
        tokens = {key: value.to(self.device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}
        self.calls += 1
        self.last_texts = tuple(texts)
        return self.model(**tokens).last_hidden_state


def load_text_encoder(
    source: str | Path, *, kind: EncoderKind, device: torch.device, dtype: torch.dtype, setting: str
) -> TextEncoder:
    """Load the encoder half of a T5 (``T5EncoderModel``) or an XLM-RoBERTa (``XLMRobertaModel``)
    and its tokenizer; a missing or unreadable source is :class:`ConditioningUnavailable`
    naming ``setting``."""
    from transformers import AutoTokenizer, T5EncoderModel, XLMRobertaModel

    source = str(Path(source).expanduser()) if Path(str(source)).expanduser().exists() else str(source)
    model_cls = T5EncoderModel if kind == "t5" else XLMRobertaModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        extra = {"add_pooling_layer": False} if kind == "xlmr" else {}  # GlueNet reads the last hidden state only
        model = model_cls.from_pretrained(source, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:
        raise ConditioningUnavailable(f"{setting}: cannot load the {kind} text encoder {source!r}: {str(exc).splitlines()[0]}") from exc
    return TextEncoder(kind, model.to(device).eval().requires_grad_(False), tokenizer)
