"""Cross-attention capture as a swappable diffusers attention processor (docs/method.md §2.1, §2.4).

``recording_attention(unet, layers)`` swaps :class:`RecordingAttnProcessor` onto the chosen
cross-attention modules for the duration of one generation and puts the original processors
back afterwards. The processor runs scaled-dot-product attention unless the
:class:`AttentionRecorder` asks it to capture this layer in this forward: then, and only then,
it computes the softmax explicitly and keeps the probabilities (with their autograd graph
when the caller runs under ``torch.enable_grad``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.utils.checkpoint
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class ForwardStopped(Exception):
    """Raised by the last wanted layer of a capture opened with ``stop_when_captured``: the
    rest of the UNet cannot change the captured maps, so guidance skips computing it."""


class AttentionRecorder:
    """Holds which layers capture in the current forward, and what they captured.

    One recorder per generation; the pipeline opens a :meth:`capture` around each UNet call
    that needs maps and reads :meth:`maps` after it. Chunked calls append, ``maps`` concatenates.
    """

    def __init__(self) -> None:
        self._layers: frozenset[str] = frozenset()
        self._captured: dict[str, list[torch.Tensor]] = {}
        self._stop_when_captured = False
        self._replaying = False

    @contextlib.contextmanager
    def capture(self, layers: Iterable[str], *, stop_when_captured: bool = False) -> Iterator["AttentionRecorder"]:
        """Capture ``layers`` in the forwards run inside the block. With ``stop_when_captured``
        the forward ends with :class:`ForwardStopped` once every layer has been captured."""
        self._layers = frozenset(layers)
        self._captured = {}
        self._stop_when_captured = stop_when_captured
        try:
            yield self
        finally:
            self._layers = frozenset()
            self._stop_when_captured = False

    def wants(self, layer: str) -> bool:
        return layer in self._layers

    def store(self, layer: str, probs: torch.Tensor) -> None:
        if self._replaying:  # a checkpointed block recomputed in the backward: its maps are held already, keep no copy
            return
        self._captured.setdefault(layer, []).append(probs)
        if self._stop_when_captured and self._layers.issubset(self._captured):
            raise ForwardStopped(layer)

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` of ``torch.utils.checkpoint``: nothing around a checkpointed block's
        forward; around its recomputation in the backward, the capture as it was in that forward
        (the capture itself has ended by then), so the guided layers take the same explicit-softmax
        path and save the same tensors, without storing or stopping again."""
        return contextlib.nullcontext(), self._replay(self._layers)

    @contextlib.contextmanager
    def _replay(self, layers: frozenset[str]) -> Iterator[None]:
        saved = self._layers, self._replaying
        self._layers, self._replaying = layers, True
        try:
            yield
        finally:
            self._layers, self._replaying = saved

    def maps(self) -> dict[str, torch.Tensor]:
        """Layer name -> softmax probabilities ``(batch, heads, h*w, tokens)``."""
        return {name: torch.cat(parts) if len(parts) > 1 else parts[0] for name, parts in self._captured.items()}

    def clear(self) -> None:
        self._captured = {}


class RecordingAttnProcessor:
    """Cross-attention with an explicit softmax when its recorder asks, SDPA otherwise.

    Adapted from ``AttnProcessor2_0.__call__`` of diffusers 0.42.1
    (diffusers/models/attention_processor.py, Apache-2.0): the same projections, norms, mask
    and output steps, with ``F.scaled_dot_product_attention`` replaced by an explicit fp32
    softmax whose probabilities go to the recorder. Re-check it against that method when the
    diffusers pin (requirements/lock.txt) moves.
    """

    def __init__(self, name: str, recorder: AttentionRecorder) -> None:
        self.name = name
        self.recorder = recorder
        self.sdpa = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self.recorder.wants(self.name) or encoder_hidden_states is None:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
        probs = scores.softmax(dim=-1)
        self.recorder.store(self.name, probs)

        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_names(unet: torch.nn.Module) -> list[str]:
    """Module names of every cross-attention (``attn2``) in the UNet, in module order."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention) and name.endswith(".attn2")]


def default_attention_layers(unet: torch.nn.Module) -> list[str]:
    """The mid block's cross-attentions plus those of the first up block that has any (§2.1).

    On SD 1.x/2.x this is exactly the reference's choice: ``mid_block.attentions.0`` (8x8 at
    512 px) and the three attentions of ``up_blocks.1`` (16x16). On other UNets (the tiny test
    models) the same rule picks their lowest-resolution cross-attentions.
    """
    names = cross_attention_names(unet)
    chosen = [n for n in names if n.startswith("mid_block.")]
    for index in range(len(getattr(unet, "up_blocks", []))):
        block = [n for n in names if n.startswith(f"up_blocks.{index}.")]
        if block:
            chosen += block
            break
    return chosen


def resolve_attention_layers(unet: torch.nn.Module, requested: list[str] | None) -> list[str]:
    """``requested`` checked against the UNet, or the default; unknown names are a ValueError."""
    if requested is None:
        layers = default_attention_layers(unet)
        if not layers:
            raise ValueError("this UNet has no cross-attention layers to guide")
        return layers
    available = set(cross_attention_names(unet))
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ValueError(
            f"attention_layers {unknown} are not cross-attention modules of this UNet; "
            f"available: {sorted(available)}"
        )
    return list(requested)


@contextlib.contextmanager
def recording_attention(unet: torch.nn.Module, layers: list[str], *, checkpointing: bool = False) -> Iterator[AttentionRecorder]:
    """Swap recording processors onto ``layers`` for the block, then restore the originals.

    ``checkpointing``: gradient checkpointing of the UNet's blocks for the block's duration
    (diffusers' own, non-reentrant ``torch.utils.checkpoint``), which only forwards run with
    gradients use, i.e. guidance's: each block keeps its inputs and is recomputed in the
    backward, so a guided row holds far fewer activations for one more partial forward."""
    recorder = AttentionRecorder()
    modules = dict(unet.named_modules())
    originals = {name: modules[name].processor for name in layers}
    checkpointed = checkpointing and not unet.is_gradient_checkpointing
    try:
        for name in layers:
            modules[name].set_processor(RecordingAttnProcessor(name, recorder))
        if checkpointed:
            unet.enable_gradient_checkpointing(functools.partial(_checkpoint, recorder))
        yield recorder
    finally:
        if checkpointed:
            unet.disable_gradient_checkpointing()
        for name, processor in originals.items():
            modules[name].set_processor(processor)


def _checkpoint(recorder: AttentionRecorder, module: torch.nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=recorder.checkpoint_contexts)


def token_maps(probs: torch.Tensor, token_indices: list[int]) -> torch.Tensor:
    """Mean attention of the given tokens: ``(batch, heads, h*w, tokens)`` -> ``(batch, heads, h*w)``."""
    return probs[..., token_indices].mean(dim=-1)


def map_shape(cells: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a flattened attention map of ``cells`` cells, from the latent's (h, w).

    UNet levels halve the latent (rounding up), so the map is the latent halved k times.
    """
    h, w = latent_hw
    while h * w > cells:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != cells:
        raise ValueError(f"an attention map of {cells} cells does not fit a latent of {latent_hw}")
    return h, w


BoxCells = Literal["corner_size", "edges"]
"""How a normalised box becomes cells of an (h, w) grid. ``"corner_size"`` (the reference,
utils/utils.py:57-70 ``scale_proportion``): the corner and the size are rounded separately,
``c0 = round(x0 * w)``, ``c1 = c0 + round((x1 - x0) * w)``, then cut to the grid, so a box keeps
its size in cells wherever it sits. ``"edges"`` (ours before issue 23): the corner floored, the far
edge rounded."""


def box_cells(box: tuple[float, float, float, float], h: int, w: int, rule: BoxCells = "corner_size") -> tuple[int, int, int, int]:
    """``(c0, r0, c1, r1)``: the cells ``[r0:r1, c0:c1]`` of an (h, w) grid that a normalised
    xyxy box covers, by ``rule`` (:data:`BoxCells`); never empty (at least the corner's cell, where
    the reference's rule would give a box under half a cell no cells at all)."""
    x0, y0, x1, y1 = box
    if rule == "corner_size":  # Python's round, as the reference (halves go to the even neighbour)
        c0, r0 = round(x0 * w), round(y0 * h)
        c1, r1 = c0 + round((x1 - x0) * w), r0 + round((y1 - y0) * h)
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, w), min(r1, h)
    elif rule == "edges":
        c0, r0 = int(x0 * w), int(y0 * h)
        c1, r1 = min(w, round(x1 * w)), min(h, round(y1 * h))
    else:
        raise ValueError(f"unknown box cell rule {rule!r}; choose 'corner_size' or 'edges'")
    c0, r0 = min(c0, w - 1), min(r0, h - 1)
    return c0, r0, max(c0 + 1, c1), max(r0 + 1, r1)


def box_mask(box: tuple[float, float, float, float], h: int, w: int, device=None, rule: BoxCells = "corner_size") -> torch.Tensor:
    """A (h, w) float mask of a normalised xyxy box (:func:`box_cells`); never empty."""
    c0, r0, c1, r1 = box_cells(box, h, w, rule)
    mask = torch.zeros(h, w, device=device)
    mask[r0:r1, c0:c1] = 1.0
    return mask
