"""SDXL as the grounded base (docs/models.md "SDXL"): what differs from SD 1.x/2.x, in one place.

An SDXL base (``StableDiffusionXLPipeline``'s topology) has two CLIP text encoders whose
penultimate hidden states are concatenated on the feature axis (768 + 1280 = 2048 on SDXL 1.0)
and a UNet with ``addition_embed_type="text_time"``: every call also takes the second encoder's
pooled embedding (``text_embeds``) and six size/crop numbers (``time_ids``), added to its time
embedding. The controller passes both in every UNet call (per-box pass, guidance forwards and
backwards, final pass, classifier-free guidance's negative rows), as diffusers' SDXL pipeline does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from grounded_sd.errors import ModelLoadError

TEXT_TIME = "text_time"
TIME_IDS = 6
"""original size (h, w), crop top-left (top, left), target size (h, w): the base's added time ids
(the refiner's UNet takes 5: an aesthetic score in place of the target size)."""
PARTS = ("text_encoder_2", "tokenizer_2")
"""The subfolders an SDXL base has beyond SD 1.x/2.x's."""

T = TypeVar("T")


def is_sdxl_unet(config) -> bool:
    """An SDXL-style UNet: its time embedding takes pooled text and time ids."""
    value = config.get("addition_embed_type") if isinstance(config, dict) else getattr(config, "addition_embed_type", None)
    return value == TEXT_TIME


def declares_sdxl(directory: Path) -> bool:
    """A local diffusers directory that says it is SDXL: ``model_index.json``'s pipeline class, or
    the UNet's ``addition_embed_type`` (read from the JSON files; no weights)."""
    index = directory / "model_index.json"
    if index.is_file():
        try:
            if str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")).startswith("StableDiffusionXL"):
                return True
        except (OSError, ValueError):
            pass  # an unreadable index: the UNet's config decides, and loading reports a broken directory
    unet_config = directory / "unet" / "config.json"
    try:
        return is_sdxl_unet(json.loads(unet_config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def check_components(unet, text_encoder, text_encoder_2) -> None:
    """A :class:`ModelLoadError` naming the mismatch when the parts cannot make an SDXL base: no
    second encoder, a UNet taking another number of time ids (the refiner's), or encoder widths
    that do not add up to the UNet's cross-attention width."""
    if text_encoder_2 is None:
        raise ModelLoadError("the UNet is SDXL-style (addition_embed_type 'text_time') but the model has no text_encoder_2")
    config = unet.config
    pooled = text_encoder_2.config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if config.addition_time_embed_dim * TIME_IDS + pooled != expected:
        raise ModelLoadError(
            f"the SDXL UNet's added embedding takes {expected} features, not {TIME_IDS} time ids x "
            f"{config.addition_time_embed_dim} + {pooled} pooled: an SDXL refiner (aesthetic-score) UNet? load it as the refiner"
        )
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if width != config.cross_attention_dim:
        raise ModelLoadError(
            f"the two text encoders give {width}-d tokens; the UNet's cross_attention_dim is {config.cross_attention_dim}"
        )


def encode(texts: list[str], tokenizers: Sequence, encoders: Sequence, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, pooled) of ``texts`` as diffusers' ``StableDiffusionXLPipeline.encode_prompt``
    (no clip skip): each encoder's penultimate hidden states, concatenated on the feature axis,
    and the second encoder's projected pooled output. Both tokenizers pad to their length limit,
    so token ``i`` of the result is token ``i`` of both tokenizations (:func:`shared_positions`)."""
    hidden: list[torch.Tensor] = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's (CLIPTextModelWithProjection: text_embeds)
    return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)


def time_ids(height: int, width: int, device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 6): original size = target size = the image's, crop (0, 0): diffusers' defaults for an
    uncropped image of the requested size."""
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)


def shared_positions(tokenizers: Sequence, positions: Callable[[object], T]) -> T:
    """``positions(tokenizer)`` (a phrase's token positions, or energy targets holding them) for
    the first tokenizer, checked against every other one.

    SDXL concatenates its two encoders' tokens on the feature axis, so position ``i`` of the UNet's
    context is token ``i`` of *both* tokenizations: guidance reads a phrase at one set of positions
    only if both tokenizers put it there. SDXL 1.0's two tokenizers share CLIP's BPE vocabulary and
    differ only in the pad token, which comes after every phrase, so they agree; a model whose
    tokenizers split a phrase differently is a :class:`ModelLoadError` naming the phrase's positions."""
    first = positions(tokenizers[0])
    for index, tokenizer in enumerate(tokenizers[1:], start=2):
        other = positions(tokenizer)
        if other != first:
            raise ModelLoadError(
                f"the model's tokenizers place the phrase tokens differently (tokenizer: {_positions(first)}, "
                f"tokenizer_{index}: {_positions(other)}); SDXL guidance needs both at the same positions"
            )
    return first


def _positions(value) -> str:
    """Short text of what :func:`shared_positions` compared (positions, or targets' positions)."""
    if isinstance(value, tuple):
        return str(value)
    return str([getattr(item, "token_indices", item) for item in value])
