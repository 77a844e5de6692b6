"""Token-level attention supervision for the shapes model (docs/shapes.md, "Teaching it where it draws").

LMD is training-free, but it assumes what SD learnt from billions of images: that a phrase's
tokens are attended to where the model draws that phrase's object (LMD paper §3.2; its energy
reads exactly that). A 4 M-parameter model trained for an hour on CPU does not learn it by
itself: it routes the caption through CLIP's padding tokens, and its phrase tokens get about
1/77 of every pixel's attention, everywhere. TokenCompose (Wang et al., CVPR 2024, §3.2) adds
two losses on the cross-attention maps of a caption's nouns during training, with segmentation
masks; ours is the pixel-wise one, on the union of a group's colour and shape tokens, with the
world's exact masks: inside an object its tokens should take the pixel's attention, outside
they should not. The base model stays a plain SD-topology UNet; only its training data changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lmd.shapes import world


@dataclass(frozen=True)
class TokenTarget:
    """Token positions of one caption group ("two red circles") and where its objects are."""

    tokens: tuple[int, ...]
    mask: np.ndarray  # (SIZE, SIZE) float32, 1 on the group's visible pixels


def visible_index(scene: world.Scene) -> np.ndarray:
    """``(SIZE, SIZE)`` int map: 1 + the index of the object seen at each pixel, 0 for background."""
    image = Image.new("L", (world.SIZE, world.SIZE), 0)
    draw = ImageDraw.Draw(image)
    for index, thing in enumerate(scene.things, start=1):
        world.draw_thing(draw, thing, index)
    return np.asarray(image)


def _word_positions(text: str, tokenizer) -> list[tuple[str, tuple[int, ...]]]:
    """Each word of ``text`` (punctuation stripped) with its token positions after BOS.

    CLIP's tokenizer splits on words and punctuation first, so word-by-word tokenization gives
    the positions of the whole text's tokens (grounded_sd.prompts relies on the same rule)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    position = 1
    for piece in re.findall(r"[a-z]+|[^\sa-z]", text.lower()):
        count = len(tokenizer.tokenize(piece))
        out.append((piece, tuple(range(position, position + count))))
        position += count
    return out


_SHAPE_WORDS = {**{s: s for s in world.SHAPES}, **{world.plural(s): s for s in world.SHAPES}}


def token_targets(text: str, scene: world.Scene, tokenizer, visible: np.ndarray | None = None) -> list[TokenTarget]:
    """The groups a caption names and the pixels of the objects each one means.

    A shape word (with the colour word just before it, if any) means every object of the scene
    with that shape (and colour); a shape after "without" means nothing and is skipped."""
    visible = visible_index(scene) if visible is None else visible
    words = _word_positions(text, tokenizer)
    targets: list[TokenTarget] = []
    negated = False
    max_position = tokenizer.model_max_length - 1
    for i, (word, positions) in enumerate(words):
        if word == "without":
            negated = True
        if word not in _SHAPE_WORDS or negated:
            continue
        shape = _SHAPE_WORDS[word]
        colour = words[i - 1][0] if i > 0 and words[i - 1][0] in world.COLOURS else None
        tokens = (words[i - 1][1] if colour else ()) + positions
        members = [k + 1 for k, t in enumerate(scene.things) if t.shape == shape and (colour is None or t.colour == colour)]
        if not members or max(tokens) >= max_position:
            continue
        mask = np.isin(visible, members).astype(np.float32)
        if mask.sum() > 0:
            targets.append(TokenTarget(tokens, mask))
    return targets


def attention_loss(maps: dict[str, torch.Tensor], targets: list[list[TokenTarget]]) -> torch.Tensor:
    """Mean over layers and targets of a balanced binary cross-entropy between the head-mean
    attention of a group's tokens and its objects' mask at the map's resolution (area-pooled):
    ``mean_in(-log a) + mean_out(-log(1 - a))`` with soft in/out weights."""
    terms: list[torch.Tensor] = []
    for probs in maps.values():  # (batch, heads, h*w, tokens)
        cells = probs.shape[2]
        side = int(round(cells**0.5))
        factor = world.SIZE // side
        for b, sample_targets in enumerate(targets):
            if not sample_targets:
                continue
            head_mean = probs[b].mean(dim=0)  # (h*w, tokens)
            for target in sample_targets:
                a = head_mean[:, list(target.tokens)].sum(dim=-1).clamp(1e-6, 1 - 1e-6)
                m = F.avg_pool2d(torch.from_numpy(target.mask)[None, None], factor).flatten()
                inside = (m * -a.log()).sum() / m.sum().clamp_min(1e-6)
                outside = ((1 - m) * -(1 - a).log()).sum() / (1 - m).sum().clamp_min(1e-6)
                terms.append(inside + outside)
    if not terms:
        return next(iter(maps.values())).new_zeros(())
    return torch.stack(terms).mean()


@torch.no_grad()
def attention_inside(maps: dict[str, torch.Tensor], targets: list[list[TokenTarget]]) -> tuple[float, float]:
    """Mean attention of groups' tokens inside their objects and outside them (a diagnostic)."""
    inside, outside = [], []
    for probs in maps.values():
        side = int(round(probs.shape[2] ** 0.5))
        factor = world.SIZE // side
        for b, sample_targets in enumerate(targets):
            head_mean = probs[b].mean(dim=0)
            for target in sample_targets:
                a = head_mean[:, list(target.tokens)].sum(dim=-1)
                m = (F.avg_pool2d(torch.from_numpy(target.mask)[None, None], factor).flatten() > 0.5).float()
                if m.sum() > 0:
                    inside.append(float((a * m).sum() / m.sum()))
                if (1 - m).sum() > 0:
                    outside.append(float((a * (1 - m)).sum() / (1 - m).sum()))
    return (float(np.mean(inside)) if inside else 0.0, float(np.mean(outside)) if outside else 0.0)
