"""The frozen text encoders behind the conditionings: T5 (ELLA) and XLM-RoBERTa (GlueNet).

Each is a transformers encoder with its tokenizer, from a hub id or a local directory. They
differ in how prompts are tokenized, as each method was trained:

- ``t5``: one prompt at a time at its own length (no padding), as ELLA's reference runs it.
- ``xlmr``: padded/truncated to exactly 77 tokens with the attention mask (GlueNet mixes
  across those 77 positions).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from grounded_sd.errors import ConditioningUnavailable
from grounded_sd.preflight import check_encoder_source

EncoderKind = Literal["t5", "xlmr"]
XLMR_TOKENS = 77
log = logging.getLogger(__name__)


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


# Weights a checkpoint may hold that the encoder half does not use: XLM-R's pooler (GlueNet reads
# the last hidden state; the released xlm-roberta-large has one), T5's decoder and LM head.
EXPECTED_UNUSED = {"xlmr": ("pooler.",), "t5": ("decoder.", "lm_head.")}


def load_text_encoder(
    source: str | Path, *, kind: EncoderKind, device: torch.device, dtype: torch.dtype, setting: str
) -> TextEncoder:
    """Load the encoder half of a T5 (``T5EncoderModel``) or an XLM-RoBERTa (``XLMRobertaModel``)
    and its tokenizer; a missing directory, an unreadable source or missing weights are
    :class:`ConditioningUnavailable` naming ``setting``.

    transformers' load report is not printed: the weights the encoder half does not use
    (:data:`EXPECTED_UNUSED`) are expected; any other unused weight is logged in one line.
    """
    from transformers import AutoTokenizer, T5EncoderModel, XLMRobertaModel

    check_encoder_source(source, kind=kind, setting=setting)
    local = Path(str(source)).expanduser()
    source = str(local) if local.exists() else str(source)
    model_cls = T5EncoderModel if kind == "t5" else XLMRobertaModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        extra = {"add_pooling_layer": False} if kind == "xlmr" else {}  # GlueNet reads the last hidden state only
        with _no_load_report():
            model, info = model_cls.from_pretrained(source, dtype=dtype, output_loading_info=True, **extra)
    except (OSError, ValueError) as exc:
        raise ConditioningUnavailable(f"{setting}: cannot load the {kind} text encoder {source!r}: {str(exc).splitlines()[0]}") from exc
    missing = sorted(info["missing_keys"])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConditioningUnavailable(
            f"{setting}: the {kind} text encoder {source!r} lacks the weight {missing[0]!r}{more}; it would run with "
            "random weights. Is it the right model?"
        )
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(EXPECTED_UNUSED[kind]))
    if unused:
        log.warning("%s: the %s text encoder %r holds %d weight(s) the encoder does not use (first: %r); ignored",
                    setting, kind, source, len(unused), unused[0])
    return TextEncoder(kind, model.to(device).eval().requires_grad_(False), tokenizer)


@contextmanager
def _no_load_report():
    """transformers logs its load report as a warning of ``transformers.modeling_utils``; we read
    the same facts from ``output_loading_info`` and say only what is unexpected (a filter, not
    a level: that logger's level changes what transformers checks)."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)
