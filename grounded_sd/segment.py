"""Step 5 of the grounded run: one mask per object from the per-box pass (docs/method.md §2.4).

Each object is segmented by :func:`grounded_sd.masks.object_mask` (its aggregated attention,
refined by SAM when loaded, with fallbacks); the mask is then reduced to the latent grid that
composition (§2.5) pastes with. The per-box images are decoded only when something reads
them (SAM, or a caller that asked for them), a chunk of at most ``max_batch`` images at a time
(one without it): attention masks read no pixel, and at SD 1.5's size the VAE decodes of the
objects cost more than the whole final pass (BENCHMARKS.md, "Real size").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from grounded_sd.compose import mask_to_latent, placement_shift, shift_cells
from grounded_sd.denoise import Run
from grounded_sd.masks import object_mask
from grounded_sd.per_box import PerBoxResult
from grounded_sd.report import GenerationReport, Intermediates
from layout_planner.layout import Layout

if TYPE_CHECKING:
    from grounded_sd.pipeline import LMDPipeline


def segment_objects(
    pipe: LMDPipeline, run: Run, layout: Layout, per_box: PerBoxResult, *, plus: bool,
    report: GenerationReport, intermediates: Intermediates, keep_images: bool = False,
) -> tuple[dict[str, Image.Image], torch.Tensor, list[tuple[int, int]]]:
    """Image-size masks by object id, the latent masks ``(N, h, w)`` bool in layout order, and
    each object's shift in cells of ``per_box.grid``. Objects generated centred are segmented
    where they were generated, then their masks move so that each mask's centre of mass lands on
    its layout box's centre (the reference's alignment); otherwise the shifts are zero.
    ``keep_images``: decode every per-box image into ``intermediates.per_box_images``."""
    options, objects = run.options, layout.objects
    h, w = run.latent_hw
    masks: dict[str, Image.Image] = {}
    latent_masks, shifts = [], []
    shortened = per_box.steps < options.steps
    images_source = per_box.last_pred_x0 if shortened and per_box.last_pred_x0 is not None else per_box.latents[-1]
    decode = pipe.sam_predictor is not None or keep_images
    if shortened:
        source = "its x0-prediction" if per_box.last_pred_x0 is not None else "its latent (the scheduler gives no x0-prediction)"
        where = f"segmented on {source}" if decode else "made from its attention (nothing decoded)"
        run.notes.append(f"per-box pass stopped at step {per_box.steps} of {options.steps}; masks {where}")
    size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    images = decoded_rows(pipe, images_source, options.max_batch or 1) if decode else iter([None] * len(objects))
    for index, (obj, image) in enumerate(zip(objects, images)):
        run.check_cancel()
        attention = per_box.attention[index].float().cpu()
        result = object_mask(
            None if image is None else np.asarray(image), attention.numpy(), per_box.boxes[index] if per_box.boxes else obj.box,
            predictor=pipe.sam_predictor, prompt="box" if plus else "point", options=options.masks, size=size,
        )
        mask = torch.from_numpy(result.mask)
        cells = mask_to_latent(mask, h, w).to(pipe.device)
        shift = placement_shift(cells, obj.box, per_box.grid) if per_box.centred else (0, 0)
        if per_box.centred:
            cells, mask = shift_cells(cells, shift, per_box.grid), shift_cells(mask, shift, per_box.grid)
        shifts.append(shift)
        mask_np = mask.numpy()
        masks[obj.id] = Image.fromarray(mask_np.astype(np.uint8) * 255, mode="L")
        latent_masks.append(cells)
        entry = report.objects[index]
        entry.mask_source, entry.mask_detail = result.source, result.detail
        entry.mask_area = float(mask_np.mean())
        entry.mask_box_iou = box_iou(mask_np, obj.box)
        entry.placement_shift = (shift[0] / per_box.grid[1], shift[1] / per_box.grid[0])
        if keep_images:
            intermediates.per_box_images[obj.id] = image
        intermediates.attention[obj.id] = attention
        intermediates.latent_masks[obj.id] = cells.cpu()
        run.progress("masks", index + 1, len(objects))
    return masks, torch.stack(latent_masks), shifts


def decoded_rows(pipe: LMDPipeline, latents: torch.Tensor, chunk: int) -> Iterator[Image.Image]:
    """Each row of ``latents`` decoded to an image, ``chunk`` rows per VAE call, as they are read."""
    for start in range(0, latents.shape[0], chunk):
        yield from pipe._decode(latents[start : start + chunk], chunk)


def box_iou(mask: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """IoU of an image-size bool mask and a normalised xyxy box (the report's ``mask_box_iou``)."""
    height, width = mask.shape
    x0, y0, x1, y1 = box
    region = np.zeros_like(mask, dtype=bool)
    px0, py0 = int(x0 * width), int(y0 * height)
    region[py0 : max(py0 + 1, round(y1 * height)), px0 : max(px0 + 1, round(x1 * width))] = True
    union = np.logical_or(mask, region).sum()
    return float(np.logical_and(mask, region).sum() / union) if union else 0.0
