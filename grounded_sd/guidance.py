"""The cross-attention energy (docs/method.md §2.1), attention transfer (§2.6) and backward
guidance (§2.2): move the latent down the energy's gradient before a denoising step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from grounded_sd.attention import BoxCells, box_mask, map_shape
from grounded_sd.counters import UNetCounter

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class EnergyTarget:
    """One object's term of the energy: its phrase's token positions, its own box, and the boxes
    its attention should stay inside (its own united with those of objects of the same phrase)."""

    object_id: str
    token_indices: tuple[int, ...]
    box: Box
    boxes: tuple[Box, ...]
    group: str = ""
    """The phrase group (identical phrases) the object belongs to, in the final pass; "" when
    objects are weighed one by one."""

    @property
    def object_token(self) -> int | None:
        """The phrase's last token (the head noun in English noun phrases): the token whose
        attention masks (§2.4) and attention transfer (§2.6) read, as in the reference."""
        return self.token_indices[-1] if self.token_indices else None


def union_mask(boxes: tuple[Box, ...], h: int, w: int, device, cells: BoxCells = "corner_size") -> torch.Tensor:
    mask = torch.zeros(h, w, device=device)
    for box in boxes:
        mask = torch.maximum(mask, box_mask(box, h, w, device, cells))
    return mask


def _topk_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values along the last axis."""
    return values.topk(k, dim=-1).values.mean(dim=-1)


def object_energy(
    probs: torch.Tensor, target: EnergyTarget, latent_hw: tuple[int, int], topk_fraction: float, background_weight: float,
    cells: BoxCells = "corner_size",
) -> torch.Tensor:
    """§2.1 for one object at one layer. ``probs``: ``(heads, h*w, tokens)`` of one sample;
    ``cells``: how its boxes become cells of the map (:data:`grounded_sd.attention.BoxCells`).

    Per head and token: ``(1 - mean(topk(A*b))) + w * mean(topk(A*(1-b)))`` with
    ``k = topk_fraction * |b|`` (resp. ``|1-b|``); mean over the phrase's tokens, sum over heads.
    """
    if not target.token_indices:
        return probs.new_zeros(())
    h, w = map_shape(probs.shape[-2], latent_hw)
    inside = union_mask(target.boxes, h, w, probs.device, cells).flatten()
    outside = 1.0 - inside
    attn = probs[:, :, list(target.token_indices)].transpose(1, 2)  # heads, tokens, h*w
    k_in = max(1, int(topk_fraction * float(inside.sum())))
    energy = 1.0 - _topk_mean(attn * inside, k_in)
    n_out = float(outside.sum())
    if n_out >= 1:
        k_out = max(1, int(topk_fraction * n_out))
        energy = energy + background_weight * _topk_mean(attn * outside, k_out)
    return energy.mean(dim=1).sum(dim=0)


def _normalised_in_box(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = maps * mask
    return masked / masked.sum(dim=-1, keepdim=True).clamp_min(1e-8)


def transfer_loss(
    probs: torch.Tensor, target: EnergyTarget, reference: torch.Tensor, latent_hw: tuple[int, int], cells: BoxCells = "corner_size"
) -> torch.Tensor:
    """§2.6 attention transfer for one object at one layer: L1 between this pass's and the per-box
    pass's attention of the object's token, both masked to the object's box and normalised to
    sum 1 per head, averaged over heads. ``reference``: ``(heads, h*w)``."""
    if target.object_token is None:
        return probs.new_zeros(())
    h, w = map_shape(probs.shape[-2], latent_hw)
    mask = box_mask(target.box, h, w, probs.device, cells).flatten()
    current = probs[:, :, target.object_token]  # heads, h*w
    diff = _normalised_in_box(current, mask) - _normalised_in_box(reference.to(current), mask)
    return diff.abs().sum(dim=-1).mean(dim=0)


@dataclass
class GuidanceTrace:
    """Energies of one pass, per object: at the first guided step before and after its updates
    (same latent, same timestep: the direct effect of guidance), and after the last guided step."""

    first: dict[str, float] = field(default_factory=dict)
    after_first_step: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    nonfinite_rows: int = 0
    """Row updates skipped because the gradient was not finite (fp16 overflow): the latent is kept."""
    carried: dict[int, float] = field(default_factory=dict)
    """Row -> the energy its last guidance iteration computed in this pass: what the ``"pass"``
    early-stop rule checks before the next iteration (the reference's carried-over loss)."""

    def record(self, per_object: dict[str, float]) -> None:
        for key, value in per_object.items():
            self.first.setdefault(key, value)


def grouped_mean(values: list[torch.Tensor], targets: list["EnergyTarget"]) -> torch.Tensor:
    """The mean over phrase groups of the mean within each group (targets with ``group`` set), or
    over objects when no target has a group: a phrase written "three apples" counts once, as any
    other phrase, not three times (the reference's normalisation)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for value, target in zip(values, targets):
        groups.setdefault(target.group or target.object_id, []).append(value)
    return torch.stack([torch.stack(members).mean() for members in groups.values()]).mean()


LossFn = Callable[[dict[str, torch.Tensor], list[int]], tuple[torch.Tensor, list[dict[str, float]]]]
"""(maps of the rows, row indices) -> (loss per row, per-object energies per row)."""


StepSizeRule = Literal["has_sigmas", "noise_sigma"]
"""Which schedulers step by ``sigma_t^2`` (:func:`guidance_step_size`)."""


def guidance_step_size(scheduler, timestep: torch.Tensor, step_index: int, rule: StepSizeRule = "noise_sigma") -> float:
    """The latent's step per unit gradient (§2.2): ``sigma_t^2`` for sigma-parameterised schedulers,
    ``sqrt(1 - alpha_bar_t)`` for the others. ``"noise_sigma"``: sigma-parameterised means an initial
    noise sigma over 1 (Euler...; DPM-Solver, UniPC and DEIS keep sigmas but run VP latents);
    ``"has_sigmas"`` (the reference's code, models/pipelines.py:60-69): any ``sigmas`` attribute."""
    if rule not in ("has_sigmas", "noise_sigma"):
        raise ValueError(f"unknown step size rule {rule!r}; choose 'has_sigmas' or 'noise_sigma'")
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and (rule == "has_sigmas" or float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0):
        return float(sigmas[step_index]) ** 2
    alpha_bar = scheduler.alphas_cumprod[int(timestep)]
    return float((1.0 - alpha_bar) ** 0.5)


GuidanceStop = Literal["pass", "step"]
"""When a row's guidance stops (§2.2). ``"pass"`` (the reference): each iteration is gated by the
energy the row's previous iteration computed (carried over between steps; none at the pass's start),
so the update computed at the first energy at or under the threshold is still applied, and the row
then gets no guidance for the rest of the pass. ``"step"``: the energy is computed afresh at every
guided step; a row at or under the threshold gets no update at that step, and guidance resumes at a
later step if its energy rises again."""


def guide_latents(
    latents: torch.Tensor,
    *,
    iterations: int,
    step_size: float,
    scale: float,
    threshold: float,
    forward: Callable[[torch.Tensor, list[int]], dict[str, torch.Tensor]],
    loss_fn: LossFn,
    counter: UNetCounter,
    max_batch: int | None,
    trace: GuidanceTrace | None = None,
    stop: GuidanceStop = "step",
    check_cancel: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """Up to ``iterations`` rounds of ``z -= scale * step_size * dE/dz`` per row (§2.2).

    Which rows move, and when they stop, follows ``stop`` (see :data:`GuidanceStop`; ``"pass"``
    needs the pass's ``trace``, which carries each row's last energy from step to step). The
    moving rows run as one batch (chunked by ``max_batch``). Gradients are taken w.r.t. the
    latent only; the update is computed in fp32, and a row whose gradient is not finite
    (fp16/bf16 overflow) keeps its latent and leaves the step instead of turning into NaN.
    """
    if stop not in ("pass", "step"):
        raise ValueError(f"unknown guidance stop rule {stop!r}; choose 'pass' or 'step'")
    if stop == "pass" and trace is None:
        raise ValueError("the 'pass' stop rule carries energies between steps in the pass's GuidanceTrace; give one")
    latents = latents.detach().clone()
    rows_all = range(latents.shape[0])
    if stop == "pass":
        active = [row for row in rows_all if trace.carried.get(row, math.inf) > threshold]
    else:
        active = list(rows_all)
    for _ in range(iterations):
        check_cancel()
        if not active:
            break
        still_active: list[int] = []
        chunk = max_batch or len(active)
        for start in range(0, len(active), chunk):
            rows = active[start : start + chunk]
            z = latents[rows].requires_grad_(True)
            with torch.enable_grad():
                maps = forward(z, rows)
                loss, per_object = loss_fn(maps, rows)
                values = loss.detach().tolist()
                above = [i for i, value in enumerate(values) if value > threshold]
                moving = list(range(len(rows))) if stop == "pass" else above
                objective = loss[moving].sum() * scale
            if trace is not None:
                for energies in per_object:
                    trace.record(energies)
                trace.carried.update({row: value for row, value in zip(rows, values)})
            if not moving or not objective.requires_grad:  # nothing to move (e.g. every phrase truncated away)
                continue
            grad = counter.grad(objective, z, batch=len(rows)).float()
            finite = grad.flatten(1).isfinite().all(dim=1)
            if trace is not None:
                trace.nonfinite_rows += int((~finite).sum())
            moved = z.detach().float() - step_size * torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            latents[rows] = torch.where(finite[:, None, None, None], moved, z.detach().float()).to(latents.dtype)
            still_active += [rows[i] for i in above if bool(finite[i])]
        if trace is not None:
            trace.iterations += 1
        active = still_active
    return latents
