"""Step 4 of the grounded run: the per-box pass (docs/method.md §2.3).

Every object is denoised alone, as "<background> with <phrase>", all objects x CFG in one
batch per step, its noise seeded from (job seed, object id) inside its box. The pass guides
each object toward its box, keeps the attention maps that attention transfer (§2.6) and the
masks (§2.4) read, and returns each object's latents at every step for composition (§2.5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from grounded_sd.attention import box_mask, map_shape, token_maps
from grounded_sd.compose import Box, box_noise, centred_box, object_seed, seeded_noise, shift_cells
from grounded_sd.conditioning.base import guidance_targets
from grounded_sd.denoise import Guidance, LayerMaps, MapCapture, Run, TextEmbeddings, denoise, pass_energies
from grounded_sd.guidance import EnergyTarget, GuidanceTrace
from grounded_sd.options import LMDOptions
from grounded_sd.prompts import join_negative, object_phrase_span, object_prompt, object_token_indices
from grounded_sd.report import GenerationReport, Intermediates
from layout_planner.layout import Layout

if TYPE_CHECKING:
    from grounded_sd.pipeline import LMDPipeline


def box_prompts(layout: Layout) -> tuple[str, ...]:
    """One prompt per object, "<background> with <phrase>" (§2.3)."""
    return tuple(object_prompt(layout.background, o.phrase) for o in layout.objects)


def box_negative(layout: Layout, options: LMDOptions) -> str:
    """The per-box negative prompt: the layout's negative, the default, the single-object words (the
    reference's order, generation/lmd.py:330-334 with prompt.py:43-44), or the single-object words first."""
    if options.per_box_negative_order == "single_object_first":
        return join_negative(options.single_object_negative, layout.negative, options.default_negative)
    return join_negative(layout.negative, options.default_negative, options.single_object_negative)


def per_box_steps(options: LMDOptions, plus: bool = False) -> int:
    """Steps the per-box pass runs: all of them (reference), or only what composition (the
    frozen steps; ``plus``: lmd_plus's), attention transfer (the guided steps) and mask aggregation use."""
    if options.per_box_full_pass:
        return options.steps
    needed = max(options.frozen_steps(plus), options.guided_steps() if options.transfer_weight > 0 else 0, options.mask_first_step() + 1)
    return max(1, min(options.steps, needed))


@dataclass
class PerBoxResult:
    """What the later steps read from the per-box pass."""

    latents: torch.Tensor  # (steps+1, N, C, h, w): each object's latent before step 0 and after every step
    last_pred_x0: torch.Tensor | None  # (N, C, h, w) the x0-prediction of the last step run, if the scheduler gives one
    steps: int
    attention: torch.Tensor  # (N, h, w): each object's cross-attention, averaged over the mask steps (§2.4)
    trace: GuidanceTrace  # the pass's guidance energies
    reference_maps: dict[int, LayerMaps] = field(default_factory=dict)  # step -> layer -> (N, heads, h*w), for transfer
    boxes: list[Box] = field(default_factory=list)  # where each object was generated (centred, or its layout box)
    centred: bool = False  # objects were generated centred and must be moved to their boxes (align_to_layout)
    grid: tuple[int, int] = (1, 1)  # the coarsest captured attention map's (h, w): the unit of that move


class _PerBoxMaps:
    """Collects, from the per-box pass's forwards, each object's token maps: per step for
    attention transfer (the final pass's guided steps), summed from ``mask_first`` for the masks."""

    def __init__(self, run: Run, targets: list[EnergyTarget], n_steps: int, device: torch.device) -> None:
        options = run.options
        self.run, self.targets = run, targets
        self.guided = options.guided_steps()
        self.transfer = options.transfer_weight > 0 and self.guided > 0
        self.mask_first = min(options.mask_first_step(), n_steps - 1)
        self.reference: dict[int, LayerMaps] = {}
        self.mask_sum: torch.Tensor | float = 0.0  # (N, h, w) at the attention map's own resolution
        self.mask_count = 0
        self.grid = run.latent_hw  # the coarsest map seen

    def layers_at(self, step: int) -> list[str]:
        return self.run.layers if (self.transfer and step < self.guided) or step >= self.mask_first else []

    def collect(self, step: int, maps: LayerMaps) -> None:
        per_object = {  # maps: the conditional rows, one per object
            layer: torch.stack([token_maps(probs[i], [t.object_token if t.object_token is not None else 0]) for i, t in enumerate(self.targets)])
            for layer, probs in maps.items()
        }
        for probs in per_object.values():
            self.grid = min(self.grid, map_shape(probs.shape[-1], self.run.latent_hw))
        if self.transfer and step < self.guided:
            self.reference[step] = per_object
        if step >= self.mask_first:
            self.mask_sum = self.mask_sum + mask_layer_mean(per_object, self.run.latent_hw)
            self.mask_count += 1

    def attention(self) -> torch.Tensor:
        return self.mask_sum / max(self.mask_count, 1)


def mask_layer_mean(per_object: LayerMaps, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Mean over heads and over the highest-resolution guided layers, at that resolution (§2.4):
    the mask code smooths in these pixels (the unit of ``MaskOptions.smooth_sigma``) before resizing."""
    cells = max(maps.shape[-1] for maps in per_object.values())
    chosen = [maps for maps in per_object.values() if maps.shape[-1] == cells]
    h, w = map_shape(cells, latent_hw)
    return torch.stack(chosen).mean(dim=0).mean(dim=1).float().view(-1, h, w)


def run_per_box_pass(
    pipe: LMDPipeline, run: Run, layout: Layout, background: torch.Tensor, text: TextEmbeddings, *, plus: bool,
    report: GenerationReport, intermediates: Intermediates,
) -> PerBoxResult:
    """Denoise every object alone in its box; GLIGEN grounds it instead of guidance in lmd_plus.
    ``text``: the per-box prompts' conditioning (:func:`box_prompts` and :func:`box_negative`)."""
    options, objects = run.options, layout.objects
    n, (h, w) = len(objects), run.latent_hw
    steps = per_box_steps(options, plus)
    report.per_box_steps = steps

    report.per_box_prompts = {o.id: p for o, p in zip(objects, box_prompts(layout))}
    centred = options.per_box_placement == "centred" and not plus  # the reference centres for LMD, not for LMD+
    boxes = [centred_box(o.box, options.placement_rule) if centred else o.box for o in objects]
    indices = [pipe.token_positions(lambda tokenizer, o=o: object_token_indices(tokenizer, layout.background, o.phrase)) for o in objects]
    targets = [EnergyTarget(o.id, i, b, (b,)) for o, i, b in zip(objects, indices, boxes)]
    spans = [object_phrase_span(layout.background, o.phrase) for o in objects]  # where each phrase is, for per-token connectors
    targets = guidance_targets(text.conditioned, "per_box", targets, list(range(n)), spans)
    foreground = torch.cat([seeded_noise((1, *background.shape[1:]), object_seed(run.seed, o.id), pipe.device, pipe.dtype) for o in objects])
    box_masks = torch.stack([box_mask(b, h, w, pipe.device, options.box_cells) for b in boxes])[:, None]
    initial = box_noise(background, foreground, box_masks, options.noise_ratio("lmd_plus" if plus else "lmd")) * run.init_sigma

    maps = _PerBoxMaps(run, targets, steps, pipe.device)
    trace = GuidanceTrace()
    guidance = None if plus else Guidance(targets, trace, pipe.energy_threshold(options, run.layers))
    gligen = pipe._gligen_inputs([[o.box] for o in objects], [[o.phrase] for o in objects]) if plus else None
    with pipe._stage(run, "per_box", steps):
        out = denoise(
            run, pipe._scheduler(options.steps), "per_box", initial, text, steps, guidance=guidance,
            capture=MapCapture(maps.layers_at, maps.collect), gligen=gligen, noise_keys=[o.id for o in objects],
        )
    latents = torch.stack(out.trajectory)
    intermediates.per_box_latents = latents.float().cpu()
    for obj, target, energy in zip(report.objects, targets, pass_energies(trace, targets)):
        obj.per_box_energy, obj.token_count = energy, len(target.token_indices)
        if not target.token_indices:
            run.notes.append(f"{obj.id}: the phrase falls past the tokenizer's limit; no guidance, box-like mask")
        obj.per_box_box = tuple(target.box)
    return PerBoxResult(latents, out.last_pred_x0, steps, maps.attention(), trace, maps.reference, boxes, centred, maps.grid)


def align_to_layout(per_box: PerBoxResult, shifts: list[tuple[int, int]]) -> PerBoxResult:
    """Move each centred object's latents (every step) and its per-box attention maps (attention
    transfer's reference) by its shift in cells of ``per_box.grid`` (the reference's alignment
    with the layout boxes, §2.5); the masks are moved where they are made (segment.py)."""
    latents = torch.stack([shift_cells(per_box.latents[:, k], shift, per_box.grid) for k, shift in enumerate(shifts)], dim=1)
    reference: dict[int, LayerMaps] = {}
    for step, layers in per_box.reference_maps.items():
        reference[step] = {}
        for layer, maps in layers.items():  # (N, heads, h*w)
            hw = map_shape(maps.shape[-1], tuple(per_box.latents.shape[-2:]))
            grids = maps.view(*maps.shape[:2], *hw)
            moved = torch.stack([shift_cells(grids[k], shift, per_box.grid) for k, shift in enumerate(shifts)])
            reference[step][layer] = moved.flatten(2)
    return dataclasses.replace(per_box, latents=latents, reference_maps=reference, centred=False)
