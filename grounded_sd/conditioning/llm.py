"""Language models as prompt encoders for a trained connector (T5 encoders, decoder-only LLMs).

A decoder-only LLM is read with an instruction before the prompt (LI-DiT, arXiv 2406.11831,
abstract and Figure 5: an instruction makes the LLM attend to image-related concepts; the
default text is HunyuanVideo's image instruction, ``hyvideo/constants.py``, slightly
reworded), at an inner layer, the third from last by default (HunyuanVideo's
``hidden_state_skip_layer=2``; the LI-DiT pages we could read name no layer), then the
connector refines the features and the instruction's tokens are dropped. A T5 encoder is read
at its last layer with no instruction (ELLA's input).

Each encoded row is laid out as ``[instruction tokens][prompt tokens, padded to max_tokens]``:
the instruction is the same for every prompt, so its token count is fixed and dropping it is
a slice. The prompt is tokenized on its own with character offsets, so every output token
knows which characters of the prompt it covers (:meth:`EncodedText.tokens_for_span`), which
is what lets LMD's guidance read a phrase's attention on a per-token connector's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from grounded_sd.errors import ConnectorError
from grounded_sd.names import Dtype

DEFAULT_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, and spatial relationships of the objects:"
)
"""The default instruction before the prompt for decoder-only LLMs (HunyuanVideo's image
instruction, reworded; kept as is so existing exports read their prompts unchanged)."""

EncoderKind = Literal["auto", "t5", "causal"]


class EncoderSpec(BaseModel):
    """Which language model encodes prompts, and how (stored in an exported connector)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="hub id or local directory of a T5 encoder or a decoder-only LLM")
    kind: EncoderKind = Field("auto", description="auto: from the model's config (t5 for T5/UMT5, causal otherwise)")
    layer: int | None = Field(None, description="hidden-state index (python style); default -3 for causal LLMs, -1 for T5")
    instruction: str | None = Field(None, description="text before the prompt; default DEFAULT_INSTRUCTION for causal LLMs, none for T5")
    max_tokens: int = Field(128, ge=4, le=4096, description="prompt tokens kept (special tokens included), padded to this")
    dtype: Dtype = Field(
        "auto", description="auto: float16 on CUDA (T5 is run in fp16 as ELLA was trained), float32 on CPU"
    )


def resolved_kind(spec: EncoderSpec, model_type: str) -> Literal["t5", "causal"]:
    if spec.kind != "auto":
        return spec.kind
    return "t5" if model_type in {"t5", "umt5", "mt5"} else "causal"


def resolved_layer(spec: EncoderSpec, kind: str) -> int:
    return spec.layer if spec.layer is not None else (-3 if kind == "causal" else -1)


def resolved_instruction(spec: EncoderSpec, kind: str) -> str:
    if spec.instruction is not None:
        return spec.instruction
    return DEFAULT_INSTRUCTION if kind == "causal" else ""


def check_encoder(spec: EncoderSpec) -> tuple[str, int, int]:
    """Read only the model's config: (kind, hidden size, number of layers), or a
    :class:`ConnectorError` naming what is wrong; no weights are loaded."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.model)
    except (OSError, ValueError) as exc:
        raise ConnectorError(f"unknown text encoder {spec.model!r}: {str(exc).splitlines()[0]}") from None
    kind = resolved_kind(spec, config.model_type)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text_config, "d_model", None) or getattr(text_config, "hidden_size", None)
    layers = getattr(text_config, "num_layers", None) or getattr(text_config, "num_hidden_layers", None)
    if hidden is None or layers is None:
        raise ConnectorError(f"text encoder {spec.model!r} ({config.model_type}) has no hidden size or layer count in its config")
    if kind == "t5" and config.model_type not in {"t5", "umt5", "mt5"}:
        raise ConnectorError(f"text encoder {spec.model!r} is a {config.model_type}, not a T5 model; use kind causal or auto")
    if kind == "causal" and getattr(config, "is_encoder_decoder", False):
        raise ConnectorError(f"text encoder {spec.model!r} is an encoder-decoder {config.model_type}; use kind t5 for T5 models")
    layer = resolved_layer(spec, kind)
    if not -(layers + 1) <= layer <= layers:
        raise ConnectorError(f"text encoder {spec.model!r} has {layers} layers ({layers + 1} hidden states); layer {layer} does not exist")
    return kind, int(hidden), int(layers)


@dataclass
class EncodedText:
    """One encoder's features for a batch of prompts.

    ``features`` (B, n_instruction + max_tokens, D) and ``mask`` (True on real tokens) cover
    the instruction and the prompt; ``offsets[row][i]`` is the character span in the prompt of
    prompt token ``i`` (None for special and padding tokens)."""

    features: torch.Tensor
    mask: torch.Tensor
    n_instruction: int
    offsets: list[list[tuple[int, int] | None]]

    @property
    def max_tokens(self) -> int:
        return self.features.shape[1] - self.n_instruction

    def to(self, device, dtype=None) -> "EncodedText":
        return EncodedText(self.features.to(device=device, dtype=dtype or self.features.dtype), self.mask.to(device), self.n_instruction, self.offsets)

    def tokens_for_span(self, row: int, start: int, end: int) -> tuple[int, ...]:
        """Prompt-token positions (after the instruction is dropped) whose characters overlap
        ``prompt[start:end]``."""
        return tuple(i for i, span in enumerate(self.offsets[row]) if span is not None and span[0] < end and span[1] > start)

    @staticmethod
    def cat(parts: list["EncodedText"]) -> "EncodedText":
        """Rows of several batches of the same encoder, as one batch."""
        return EncodedText(
            torch.cat([p.features for p in parts]), torch.cat([p.mask for p in parts]), parts[0].n_instruction,
            [row for p in parts for row in p.offsets],
        )

    def select(self, rows: list[int]) -> "EncodedText":
        return EncodedText(self.features[rows], self.mask[rows], self.n_instruction, [self.offsets[r] for r in rows])


class LLMTextEncoder:
    """A frozen language model that turns prompts into :class:`EncodedText` (one layer's hidden states)."""

    def __init__(self, spec: EncoderSpec, model, tokenizer, kind: str) -> None:
        self.spec, self.model, self.tokenizer, self.kind = spec, model.eval().requires_grad_(False), tokenizer, kind
        self.layer = resolved_layer(spec, kind)
        self.instruction = resolved_instruction(spec, kind)
        self.hidden_size = int(model.config.d_model if kind == "t5" else model.config.hidden_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.prefix_ids = self._prefix_ids()

    @classmethod
    def load(cls, spec: EncoderSpec, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "LLMTextEncoder":
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        kind, _, _ = check_encoder(spec)
        device = torch.device(device)
        if dtype is None:
            dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
                spec.dtype, torch.float16 if device.type == "cuda" else torch.float32
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.model)
            if kind == "t5":
                model = T5EncoderModel.from_pretrained(spec.model, dtype=dtype)
            else:
                model = AutoModel.from_pretrained(spec.model, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConnectorError(f"cannot load text encoder {spec.model!r}: {str(exc).splitlines()[0]}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ConnectorError(f"text encoder {spec.model!r} needs a fast tokenizer (tokenizer.json) for character offsets")
        model = getattr(model, "language_model", model)  # multimodal wrappers: their text model
        return cls(spec, model.to(device), tokenizer, kind)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prefix_ids(self) -> list[int]:
        """The instruction's tokens, with the tokenizer's leading BOS if it adds one; no EOS."""
        if not self.instruction:
            return []
        ids = self.tokenizer(self.instruction + "\n", add_special_tokens=True).input_ids
        eos, bos = self.tokenizer.eos_token_id, self.tokenizer.bos_token_id
        if ids and eos is not None and ids[-1] == eos and eos != bos:
            ids = ids[:-1]
        return ids

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int] | None]]]:
        """(ids, mask, offsets) of ``[instruction][prompt padded to max_tokens]`` per prompt."""
        n = self.spec.max_tokens
        enc = self.tokenizer(
            list(prompts), add_special_tokens=True, truncation=True, max_length=n + (1 if self.prefix_ids else 0),
            return_offsets_mapping=True, return_special_tokens_mask=True,
        )
        rows_ids, rows_mask, rows_offsets = [], [], []
        bos = self.tokenizer.bos_token_id
        for ids, offsets, special in zip(enc.input_ids, enc.offset_mapping, enc.special_tokens_mask):
            if self.prefix_ids and ids and bos is not None and ids[0] == bos:  # the prefix carries the BOS
                ids, offsets, special = ids[1:], offsets[1:], special[1:]
            ids, offsets, special = ids[:n], offsets[:n], special[:n]
            if not ids and not self.prefix_ids:  # an empty prompt with no instruction: one EOS to attend to
                ids, offsets, special = [self.tokenizer.eos_token_id or self.pad_id], [(0, 0)], [1]
            spans = [None if s or a == b else (int(a), int(b)) for (a, b), s in zip(offsets, special)]
            pad = n - len(ids)
            rows_ids.append(self.prefix_ids + list(ids) + [self.pad_id] * pad)
            rows_mask.append([1] * (len(self.prefix_ids) + len(ids)) + [0] * pad)
            rows_offsets.append(spans + [None] * pad)
        return torch.tensor(rows_ids), torch.tensor(rows_mask, dtype=torch.bool), rows_offsets

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> EncodedText:
        ids, mask, offsets = self.tokenize(prompts)
        device = self.device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device).long(), output_hidden_states=True)
        features = out.hidden_states[self.layer]
        return EncodedText(features, mask.to(device), len(self.prefix_ids), offsets)
