"""Object masks from cross-attention, refined with segment-anything (docs/method.md §2.4).

Each object of a layout has its own per-box generation (§2.3). Its mask decides which
pixels of that generation are pasted into the composition (§2.5). We start from the
object token's aggregated cross-attention (coarse, low resolution) and, when a SAM
checkpoint is configured, ask SAM for a sharper mask. SAM's three candidates are checked
against the attention: a candidate SAM itself doubts (predicted IoU below
``sam_min_predicted_iou``) or one that disagrees with the attention (IoU with the coarse
mask below ``sam_min_coarse_iou``) is rejected, and the largest remaining one wins.

A mask never fails a job: without SAM, or when every candidate is rejected, the coarse
attention mask is used; when the attention is empty or not finite, the box itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from grounded_sd.errors import MaskInputError, SamCheckpointError
from grounded_sd.names import SAM_MODEL_TYPES

if TYPE_CHECKING:
    from segment_anything import SamPredictor

# The image encoder's width tells the published checkpoints apart (segment_anything/build_sam.py).
_ENCODER_WIDTH_TO_TYPE = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}

MaskSource = Literal["sam", "attention", "box"]
SamPrompt = Literal["point", "box"]


class MaskOptions(BaseModel):
    """How an object's mask is made (docs/method.md §2.4).

    The SAM thresholds and the smoothing sigma are the reference's values; the coarse mask's
    rule (a fraction of the peak *inside the box*) and the cut to the grown box are ours, see
    docs/masks.md ("Differences from the reference")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sam_min_predicted_iou: float = Field(
        0.85, ge=0.0, le=1.0, description="reject SAM candidates whose own predicted IoU is below this (ref 0.85)"
    )
    sam_min_coarse_iou: float = Field(
        0.25, ge=0.0, le=1.0, description="reject SAM candidates whose IoU with the coarse attention mask is below this (ref 0.25)"
    )
    attention_threshold: float = Field(
        0.25, gt=0.0, le=1.0, description="coarse mask = smoothed attention >= this fraction of its maximum inside the box (ref 0.25)"
    )
    smooth_sigma: float = Field(
        1.5,
        ge=0.0,
        le=16.0,
        description=(
            "gaussian sigma in pixels of the attention map as captured (16x16 on SD at 512 px), before any "
            "resizing (ref 1.5 with a point prompt); 0 turns it off"
        ),
    )
    sam_box_margin: float | None = Field(
        0.1,
        ge=0.0,
        description=(
            "the chosen SAM mask is cut to the layout box grown by this fraction of its width/height on each "
            "side, so an object cannot spill far outside the place the layout gave it; None: no cut (the "
            "reference does not cut)"
        ),
    )


class MaskCandidate(BaseModel):
    """One of SAM's candidates and why it was or was not chosen."""

    model_config = ConfigDict(frozen=True)

    index: int
    predicted_iou: float = Field(description="SAM's own quality estimate")
    coarse_iou: float = Field(
        description="IoU with what SAM's answer is judged against: the coarse attention mask (point prompt), the box (box prompt, or no usable attention)"
    )
    area: float = Field(description="fraction of the image covered by the candidate")
    rejected: str | None = Field(None, description="why it was rejected; None for acceptable candidates")


@dataclass
class MaskResult:
    """An object's mask at image resolution, where it came from, and why."""

    mask: np.ndarray  # bool, (H, W)
    source: MaskSource
    detail: str
    candidates: list[MaskCandidate] = field(default_factory=list)
    sam_prompt: tuple[int, ...] | None = None  # the click (x, y) or box (x0, y0, x1, y1) SAM got, in pixels


def load_sam_predictor(checkpoint: Path | str, model_type: str, device: str = "cpu") -> "SamPredictor":
    """Build a published SAM (``vit_h``, ``vit_l``, ``vit_b``) from its checkpoint and wrap it in a predictor.

    The checkpoint is checked against the architecture before the full model is built, so
    a checkpoint of another type fails fast with a message that names the type it holds.
    Smaller custom SAMs can be used by passing ``SamPredictor(sam)`` to :func:`object_mask`.
    """
    from segment_anything import SamPredictor, sam_model_registry

    path = Path(checkpoint)
    if model_type not in SAM_MODEL_TYPES:
        raise SamCheckpointError(f"unknown SAM model type {model_type!r}; choose one of {', '.join(SAM_MODEL_TYPES)}")
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint not found: {path}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise SamCheckpointError(f"invalid device {device!r} for SAM: {exc}") from exc
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise SamCheckpointError(f"cannot read SAM checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise SamCheckpointError(f"SAM checkpoint {path} does not hold a state dict of tensors")

    builder = sam_model_registry[model_type]
    with torch.device("meta"):
        skeleton = builder()
    _check_state_dict(state_dict, skeleton.state_dict(), path, model_type)

    sam = builder()
    sam.load_state_dict(state_dict)
    sam.to(torch_device).eval()
    return SamPredictor(sam)


def _check_state_dict(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, model_type: str
) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
    pos_embed = state_dict.get("image_encoder.pos_embed")
    guess = _ENCODER_WIDTH_TO_TYPE.get(int(pos_embed.shape[-1])) if pos_embed is not None and pos_embed.ndim else None
    hint = f"; it looks like a {guess} checkpoint" if guess and guess != model_type else ""
    raise SamCheckpointError(f"SAM checkpoint {path} does not fit model type {model_type}: {'; '.join(problems)}{hint}")


def object_mask(
    image: np.ndarray | None,
    attention: np.ndarray,
    box: tuple[float, float, float, float],
    *,
    predictor: "SamPredictor | None",
    prompt: SamPrompt = "point",
    options: MaskOptions | None = None,
    size: tuple[int, int] | None = None,
) -> MaskResult:
    """The mask of one object on its per-box image (docs/method.md §2.4).

    ``image``: (H, W, 3) uint8, the decoded per-box generation. ``attention``: (h, w), the
    object token's aggregated cross-attention at any resolution; zeros, NaN and inf are
    tolerated (they lead to the box fallback). ``box``: normalised xyxy. ``prompt``:
    ``"point"`` asks SAM with a click on the attention peak inside the box (LMD),
    ``"box"`` with the layout box (LMD+). Bad maps never raise; a malformed image or
    box raises :class:`MaskInputError`.

    Without a predictor no pixel is read: ``image`` may then be None and ``size`` (height,
    width) gives the mask's size instead, so the caller need not decode the per-box image.
    """
    options = options or MaskOptions()
    if prompt not in ("point", "box"):
        raise MaskInputError(f"unknown SAM prompt {prompt!r}; choose 'point' or 'box'")
    if image is None:
        if predictor is not None:
            raise MaskInputError("SAM refines masks on the per-box image; got no image")
        height, width = _check_size(size)
    else:
        height, width = _check_image(image)
    x0, y0, x1, y1 = _box_pixels(box, width, height)
    in_box = np.zeros((height, width), dtype=bool)
    in_box[y0:y1, x0:x1] = True

    heat, problem = _attention_heatmap(attention, height, width, options.smooth_sigma)
    coarse = None
    if heat is not None:
        box_heat = np.where(in_box, heat, 0.0)
        peak = float(box_heat.max())
        if peak > 0.0:
            coarse = box_heat >= options.attention_threshold * peak
        else:
            problem = "attention is zero inside the box"

    if coarse is not None:
        fallback = MaskResult(coarse, "attention", f"attention >= {options.attention_threshold:g} x its peak inside the box")
        reference = coarse
        peak_row, peak_col = np.unravel_index(int(np.argmax(box_heat)), box_heat.shape)
        point = (int(peak_col), int(peak_row))
    else:
        fallback = MaskResult(in_box.copy(), "box", f"the layout box ({problem})")
        reference = in_box
        point = ((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2)

    if predictor is None:
        fallback.detail += "; SAM not configured"
        return fallback

    sam_prompt = (x0, y0, x1, y1) if prompt == "box" else point
    fallback.sam_prompt = sam_prompt
    if prompt == "box":  # LMD+ (as the reference): SAM was asked about the box, so its answers are judged against the box
        reference = in_box
    try:
        predictor.set_image(image)
        if prompt == "box":
            sam_masks, sam_scores, _ = predictor.predict(box=np.array(sam_prompt, dtype=np.float32), multimask_output=True)
        else:
            sam_masks, sam_scores, _ = predictor.predict(
                point_coords=np.array([sam_prompt], dtype=np.float32), point_labels=np.array([1]), multimask_output=True
            )
    except RuntimeError as exc:  # e.g. out of memory: a mask never fails the job
        fallback.detail += f"; SAM failed ({type(exc).__name__}: {exc})"
        return fallback

    against = "box" if reference is in_box else "coarse"
    candidates = _judge_candidates(
        np.asarray(sam_masks, dtype=bool), np.asarray(sam_scores, dtype=np.float64), reference, against, options
    )
    accepted = [c for c in candidates if c.rejected is None]
    if not accepted:
        reasons = "; ".join(f"{c.index}: {c.rejected}" for c in candidates)
        fallback.detail += f"; all {len(candidates)} SAM candidates rejected ({reasons})"
        fallback.candidates = candidates
        return fallback

    best = max(accepted, key=lambda c: (c.area, c.predicted_iou))
    mask = np.asarray(sam_masks[best.index], dtype=bool)
    if options.sam_box_margin is not None:
        mask = mask & _grown_box(box, width, height, options.sam_box_margin)
    if not mask.any():
        fallback.detail += f"; SAM candidate {best.index} is empty inside the grown box"
        fallback.candidates = candidates
        return fallback
    detail = (
        f"sam candidate {best.index} ({prompt} prompt), predicted IoU {best.predicted_iou:.2f}, "
        f"IoU with {against} {best.coarse_iou:.2f}"
    )
    return MaskResult(mask, "sam", detail, candidates, sam_prompt)


def _judge_candidates(
    masks: np.ndarray, scores: np.ndarray, reference: np.ndarray, against: str, options: MaskOptions
) -> list[MaskCandidate]:
    """Score every SAM candidate against SAM's own estimate and ``reference`` (the attention's
    coarse mask, or the box; ``against`` names it in the rejection reasons)."""
    judged = []
    for index, (mask, score) in enumerate(zip(masks, scores)):
        union = np.logical_or(mask, reference).sum()
        coarse_iou = float(np.logical_and(mask, reference).sum() / union) if union else 0.0
        rejected = None
        if not mask.any():
            rejected = "empty"
        elif not score >= options.sam_min_predicted_iou:
            rejected = f"predicted IoU {score:.2f} < {options.sam_min_predicted_iou:g}"
        elif coarse_iou < options.sam_min_coarse_iou:
            rejected = f"IoU with {against} {coarse_iou:.2f} < {options.sam_min_coarse_iou:g}"
        judged.append(
            MaskCandidate(
                index=index, predicted_iou=float(score), coarse_iou=coarse_iou, area=float(mask.mean()), rejected=rejected
            )
        )
    return judged


def _check_image(image: np.ndarray) -> tuple[int, int]:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise MaskInputError(f"image must be an (H, W, 3) uint8 array, got shape {shape} of {dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise MaskInputError(f"image is empty: shape {image.shape}")
    return int(image.shape[0]), int(image.shape[1])


def _check_size(size: object) -> tuple[int, int]:
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size)):
        raise MaskInputError(f"without an image, size must be (height, width) in whole pixels >= 1, got {size!r}")
    return size[0], size[1]


def _box_pixels(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel corners, at least one pixel wide (the same rounding as ``LayoutObject.box_pixels``)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise MaskInputError(f"box must be four numbers x0, y0, x1, y1, got {box!r}") from exc
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise MaskInputError(f"box {[x0, y0, x1, y1]} must be normalised xyxy with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    px0 = min(width - 1, max(0, int(x0 * width)))
    py0 = min(height - 1, max(0, int(y0 * height)))
    px1 = max(px0 + 1, min(width, round(x1 * width)))
    py1 = max(py0 + 1, min(height, round(y1 * height)))
    return px0, py0, px1, py1


def _grown_box(box: tuple[float, float, float, float], width: int, height: int, margin: float) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    grown = (max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy))
    gx0, gy0, gx1, gy1 = _box_pixels(grown, width, height)
    region = np.zeros((height, width), dtype=bool)
    region[gy0:gy1, gx0:gx1] = True
    return region


def _attention_heatmap(attention: object, height: int, width: int, sigma: float) -> tuple[np.ndarray | None, str]:
    """Smoothed attention scaled to 0..1 by its maximum, bilinearly upsampled to (height, width).

    Returns ``(None, why)`` for a map that cannot serve (wrong shape, empty, nothing finite
    and positive), never raises.
    """
    if isinstance(attention, torch.Tensor):
        attention = attention.detach().float().cpu().numpy()
    try:
        values = np.asarray(attention, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        return None, f"attention is not numeric ({exc})"
    values = np.squeeze(values)
    if values.ndim != 2 or values.size == 0:
        return None, f"attention has shape {np.shape(attention)}, expected (h, w)"
    values = np.where(np.isfinite(values), values, 0.0).clip(min=0.0)
    if not values.max() > 0.0:
        return None, "attention is empty or not finite"
    grid = torch.from_numpy(np.ascontiguousarray(values))[None, None]
    if sigma > 0:
        grid = _gaussian_blur(grid, sigma)
    grid = grid / grid.max().clamp(min=1e-12)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return grid[0, 0].numpy(), ""


def _gaussian_blur(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of a (1, 1, h, w) map; borders replicate the edge values."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=grid.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    grid = F.pad(grid, (radius, radius, radius, radius), mode="replicate")
    grid = F.conv2d(grid, kernel.view(1, 1, 1, -1))
    return F.conv2d(grid, kernel.view(1, 1, -1, 1))
