"""Live previews: a cheap look at the latents while stage 2 runs, without the VAE.

Stable Diffusion's 4 latent channels map to RGB almost linearly, so a fixed 4x3 matrix gives a
recognisable (blurry, 1/8 resolution) picture for the price of one small matrix product. The
pipeline calls a ``PreviewFn`` every few steps, only when the caller passed one:

- ``per_box``: each object's own latent shown inside its box (largest box first, so small
  boxes stay visible), outside the boxes a neutral grey: how every object is grounded alone;
- ``compose``: the composition (each object's latent inside its mask, §2.5);
- ``final`` / ``sd``: the scene latent of the final (or plain SD) pass.

Where the scheduler gives one, the preview shows its x0-prediction (what the step thinks the
clean latent is) rather than the noisy latent, which is mostly noise early on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# Least-squares fit of SD 1.x/2.x's decoded RGB (-1..1) on the 4 scaled latent channels; rows
# are latent channels, columns R, G, B. Good enough to recognise colours and shapes.
LATENT_TO_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
PREVIEW_SIDE = 256  # the longer side of a preview image, in pixels
GREY = 96

PreviewFn = Callable[[str, int, int, Image.Image], None]
"""``preview(stage, step, total, image)``: called every few steps while a preview is wanted."""


def preview_interval(total: int, previews_per_pass: int = 8) -> int:
    """Steps between two previews of one pass: about ``previews_per_pass`` per pass, at least every step."""
    return max(1, round(total / previews_per_pass))


def latent_rgb(latent: torch.Tensor) -> np.ndarray:
    """(C, h, w) latent -> (h, w, 3) uint8 by the fixed linear map (C other than 4: the first 3 channels as grey-ish RGB)."""
    latent = latent.detach().float().cpu()
    if latent.shape[0] == len(LATENT_TO_RGB):
        rgb = torch.einsum("chw,cr->hwr", latent, torch.tensor(LATENT_TO_RGB))
    else:
        rgb = latent[:3].permute(1, 2, 0) if latent.shape[0] >= 3 else latent[:1].permute(1, 2, 0).expand(-1, -1, 3)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _preview_size(h: int, w: int) -> tuple[int, int]:
    scale = PREVIEW_SIDE / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _box_cells(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    c0, r0 = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
    return c0, r0, max(c0 + 1, round(x1 * w)), max(r0 + 1, round(y1 * h))


def scene_preview(latent: torch.Tensor) -> Image.Image:
    """One scene latent (C, h, w) as an RGB preview."""
    rgb = latent_rgb(latent)
    return Image.fromarray(rgb, "RGB").resize(_preview_size(*rgb.shape[:2]), Image.Resampling.BILINEAR)


def per_box_preview(latents: torch.Tensor, boxes: Sequence[Sequence[float]]) -> Image.Image:
    """Each object's latent (N, C, h, w) inside its own box on grey, outlined; largest box first."""
    h, w = latents.shape[-2:]
    canvas = np.full((h, w, 3), GREY, dtype=np.uint8)
    order = sorted(range(len(boxes)), key=lambda k: -(boxes[k][2] - boxes[k][0]) * (boxes[k][3] - boxes[k][1]))
    for k in order:
        c0, r0, c1, r1 = _box_cells(boxes[k], h, w)
        canvas[r0:r1, c0:c1] = latent_rgb(latents[k][:, r0:r1, c0:c1])
    size = _preview_size(h, w)
    image = Image.fromarray(canvas, "RGB").resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for k in order:
        x0, y0, x1, y1 = boxes[k]
        draw.rectangle([x0 * size[0], y0 * size[1], x1 * size[0] - 1, y1 * size[1] - 1], outline=(255, 255, 255))
    return image


def composed_preview(latents: torch.Tensor, owner: torch.Tensor) -> Image.Image:
    """The composition: object ``k``'s latent (N, C, h, w) where ``owner == k+1``, grey elsewhere."""
    h, w = latents.shape[-2:]
    canvas = np.full((h, w, 3), GREY, dtype=np.uint8)
    owner_np = owner.cpu().numpy()
    for k in range(latents.shape[0]):
        cells = owner_np == k + 1
        if cells.any():
            canvas[cells] = latent_rgb(latents[k])[cells]
    return Image.fromarray(canvas, "RGB").resize(_preview_size(h, w), Image.Resampling.BILINEAR)
