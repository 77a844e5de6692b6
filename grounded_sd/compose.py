"""Noise per object id, the per-box initial latents, and latent composition
(docs/method.md §2.3, §2.5, §2.7)."""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
import torch.nn.functional as F


def object_seed(seed: int, object_id: str) -> int:
    """A stable 63-bit seed from (job seed, object id) (§2.7); ``hash()`` is salted per process."""
    digest = hashlib.sha256(f"lmd-object:{int(seed)}:{object_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def step_noise_seed(seed: int, key: str) -> int:
    """The seed of a stochastic scheduler's step noise for one row: an object id in the per-box
    pass, "" for the scene (§2.7); distinct from the object's initial-noise seed."""
    digest = hashlib.sha256(f"lmd-step-noise:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def seeded_noise(shape: tuple[int, ...], seed: int, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn on the CPU (identical on every device), then moved."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def box_noise(background: torch.Tensor, foreground: torch.Tensor, box_masks: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-box initial noise (§2.3): the background noise outside each box and
    ``sqrt(1-r) * bg + sqrt(r) * fg_i`` inside it. Unit variance is kept inside the box.

    ``background`` (1, C, h, w); ``foreground`` (N, C, h, w); ``box_masks`` (N, 1, h, w) in {0, 1}.
    """
    inside = (1.0 - ratio) ** 0.5 * background + ratio**0.5 * foreground
    return torch.where(box_masks.bool(), inside, background.expand_as(foreground))


def mask_to_latent(mask: torch.Tensor, h: int, w: int, rule: str = "centre") -> torch.Tensor:
    """An image-resolution bool mask -> (h, w) bool. ``"centre"`` (the reference, models/sam.py:51:
    bilinear resize to the latent grid, then ``bool``): a cell counts when any of the pixels around its
    centre that the bilinear sample reads is set; ``"half"``: when at least half of it is covered.
    A mask too small for either keeps every cell it touches (the reference fails on it, utils/utils.py:78-82)."""
    if rule not in ("centre", "half"):
        raise ValueError(f"unknown latent mask rule {rule!r}; choose 'centre' or 'half'")
    if rule == "centre":
        cells = F.interpolate(mask[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0
        if cells.any():
            return cells
    coverage = F.interpolate(mask[None, None].float(), size=(h, w), mode="area")[0, 0]
    cells = coverage >= 0.5
    return cells if cells.any() else coverage > 0


def mask_box(mask: torch.Tensor, margin: int = 1) -> torch.Tensor:
    """The bounding box of a (h, w) bool mask, grown by ``margin`` cells per side, as a mask."""
    box = torch.zeros_like(mask)
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if len(rows) == 0:
        return box
    r0, r1 = max(0, int(rows.min()) - margin), int(rows.max()) + margin + 1
    c0, c1 = max(0, int(cols.min()) - margin), int(cols.max()) + margin + 1
    box[r0:r1, c0:c1] = True
    return box


def compose_latents(
    per_box: torch.Tensor, masks: torch.Tensor, background: torch.Tensor, *, step0: str = "mask_box"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste every object's latent inside its mask, largest mask first (small ones end on top) (§2.5).

    ``per_box`` (steps+1, N, C, h, w): each object's latent before step 0 and after every step;
    ``masks`` (N, h, w) bool; ``background`` (1, C, h, w) the background noise.
    Returns ``composed`` (steps+1, 1, C, h, w) and ``owner`` (h, w) long: 0 for background,
    ``k+1`` where object ``k`` is on top. Step 0 starts from the background noise with each
    object's initial noise pasted in its mask's bounding box grown by one cell
    (``step0="mask_box"``, the reference) or in its mask only (``"mask"``); later steps hold only
    foreground (their background cells are never read).
    """
    if step0 not in ("mask_box", "mask"):
        raise ValueError(f"unknown step0 {step0!r}; choose 'mask_box' or 'mask'")
    steps_plus_one, n = per_box.shape[:2]
    composed = torch.zeros((steps_plus_one, 1, *per_box.shape[2:]), dtype=per_box.dtype, device=per_box.device)
    composed[0] = background
    owner = torch.zeros(masks.shape[1:], dtype=torch.long, device=masks.device)
    areas = masks.flatten(1).sum(dim=1)
    order = torch.argsort(areas, descending=True, stable=True).tolist()
    if step0 == "mask_box":
        for k in order:
            cells = mask_box(masks[k])
            composed[0, 0, :, cells] = per_box[0, k, :, cells]
    for k in order:
        cells = masks[k]
        composed[:, 0, :, cells] = per_box[:, k, :, cells]
        owner[cells] = k + 1
    return composed, owner


# --- per-box placement (the reference's centred per-box generation, §2.3, §2.5) -----------------
FLOOR_PADDING = 0.2
"""A centred object's box ends this far above the bottom edge (the reference's floor padding)."""

Box = tuple[float, float, float, float]


PlacementRule = Literal["reference", "on_canvas"]
"""The details of centred placement (``LMDOptions.placement_rule``): ``"reference"`` as the
reference computes them, ``"on_canvas"`` keeping every box and mask whole on the canvas."""


def centred_box(box: Box, rule: PlacementRule = "reference") -> Box:
    """Where an object is generated in the per-box pass with ``per_box_placement="centred"``: the
    layout box's size, centred horizontally, its bottom ``FLOOR_PADDING`` above the canvas's. A box
    taller than that leaves room for starts above the canvas under ``"reference"`` (y0 < 0: its
    cells are cut at the top, as the reference's ``get_centered_box``, utils/utils.py:36-40, and
    ``scale_proportion`` do), and moves down as far as needed to stay whole under ``"on_canvas"``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    bottom = 1.0 - FLOOR_PADDING if rule == "reference" else max(1.0 - FLOOR_PADDING, h)
    return (0.5 - w / 2, bottom - h, 0.5 + w / 2, bottom)


def on_canvas(box: Box) -> Box:
    """``box`` cut to the canvas (a centred tall box under the reference's rule starts above it)."""
    x0, y0, x1, y1 = box
    return (max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1))


def placement_shift(cells: torch.Tensor, box: Box, grid: tuple[int, int], rule: PlacementRule = "reference") -> tuple[int, int]:
    """The shift, in cells of ``grid``, that moves the centre of mass of ``cells`` onto the centre of
    ``box``: whole cells of the coarsest attention map, so latents, masks and every attention map
    move by whole cells of their own grids. ``cells`` (h, w) bool; an empty mask does not move.

    ``"reference"`` (utils/latents.py:85-105 with utils/utils.py:102-121 and 145-154): the centre of
    mass at cell indices (``arange(w) / w``, half a cell up and left of the cells' centres), the
    shift ``round(offset * grid)`` as it comes, unless it would push the whole mask off the canvas.
    ``"on_canvas"``: at cell centres (``+ 0.5``), and the shift limited so that rounding never pushes
    any of the mask off the canvas."""
    if not bool(cells.any()):
        return 0, 0
    h, w = cells.shape
    weights = cells.float()
    total = weights.sum()
    half = 0.0 if rule == "reference" else 0.5
    x = float((weights.sum(dim=0) * (torch.arange(w, device=cells.device) + half)).sum() / total) / w
    y = float((weights.sum(dim=1) * (torch.arange(h, device=cells.device) + half)).sum() / total) / h
    gh, gw = grid
    shift_x, shift_y = round(((box[0] + box[2]) / 2 - x) * gw), round(((box[1] + box[3]) / 2 - y) * gh)
    if rule == "reference" and bool(shift_cells(cells, (shift_x, shift_y), grid).any()):
        return shift_x, shift_y
    # rounding to whole grid cells must not push the mask off the canvas (a box at the edge); under the
    # reference's rule only a mask that would leave it entirely is held back (the reference fails there:
    # utils/utils.py:78-82, the bounding box of an empty mask)
    rows, cols = cells.any(dim=1).nonzero().flatten(), cells.any(dim=0).nonzero().flatten()
    return _clamp_shift(shift_x, int(cols.min()), int(cols.max()), w, gw), _clamp_shift(shift_y, int(rows.min()), int(rows.max()), h, gh)


def _clamp_shift(shift: int, first: int, last: int, size: int, grid: int) -> int:
    """``shift`` (grid cells) limited so that cells ``first..last`` of ``size`` stay on the canvas."""
    per_cell = size / grid
    lowest, highest = math.ceil(-first / per_cell), math.floor((size - 1 - last) / per_cell)
    return min(max(shift, lowest), highest) if lowest <= highest else shift


def shift_cells(tensor: torch.Tensor, shift: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``tensor`` (..., H, W) moved by ``shift`` cells of ``grid`` (scaled to H, W); what leaves the
    canvas is dropped and what enters is zero."""
    height, width = tensor.shape[-2:]
    dx, dy = round(shift[0] * width / grid[1]), round(shift[1] * height / grid[0])
    out = torch.zeros_like(tensor)
    if abs(dx) >= width or abs(dy) >= height:
        return out
    src_y, dst_y = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
    out[..., dst_y, dst_x] = tensor[..., src_y, src_x]
    return out
