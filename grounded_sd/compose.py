"""Noise per object id, the per-box initial latents, and latent composition
(docs/method.md §2.3, §2.5, §2.7)."""

from __future__ import annotations

import hashlib

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


def mask_to_latent(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """An image-resolution bool mask -> (h, w) bool: cells at least half covered; a mask too
    small for that keeps every cell it touches."""
    coverage = F.interpolate(mask[None, None].float(), size=(h, w), mode="area")[0, 0]
    cells = coverage >= 0.5
    return cells if cells.any() else coverage > 0


def compose_latents(per_box: torch.Tensor, masks: torch.Tensor, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste every object's latent inside its mask, largest mask first (small ones end on top) (§2.5).

    ``per_box`` (steps+1, N, C, h, w): each object's latent before step 0 and after every step;
    ``masks`` (N, h, w) bool; ``background`` (1, C, h, w) the background noise.
    Returns ``composed`` (steps+1, 1, C, h, w) and ``owner`` (h, w) long: 0 for background,
    ``k+1`` where object ``k`` is on top. Step 0 starts from the background noise; later
    steps hold only foreground (their background cells are never read).
    """
    steps_plus_one, n = per_box.shape[:2]
    composed = torch.zeros((steps_plus_one, 1, *per_box.shape[2:]), dtype=per_box.dtype, device=per_box.device)
    composed[0] = background
    owner = torch.zeros(masks.shape[1:], dtype=torch.long, device=masks.device)
    areas = masks.flatten(1).sum(dim=1)
    for k in torch.argsort(areas, descending=True, stable=True).tolist():
        cells = masks[k]
        composed[:, 0, :, cells] = per_box[:, k, :, cells]
        owner[cells] = k + 1
    return composed, owner
