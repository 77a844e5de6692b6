"""Step 7 of the grounded run: the final pass over the whole scene (docs/method.md §2.6).

It starts from the composed latent, keeps the composition inside the masks for the first
``frozen_ratio`` of its steps, guides every object (grouped by phrase) toward its box, and
pulls each object's attention toward what it was in the per-box pass (attention transfer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from grounded_sd.conditioning.base import guidance_targets
from grounded_sd.denoise import FrozenForeground, Guidance, Run, TextEmbeddings, denoise, pass_energies
from grounded_sd.guidance import EnergyTarget, GuidanceTrace
from grounded_sd.per_box import PerBoxResult
from grounded_sd.prompts import group_phrases, scene_phrase_spans, scene_token_indices
from grounded_sd.report import GenerationReport, Intermediates
from layout_planner.layout import Layout

if TYPE_CHECKING:
    from grounded_sd.pipeline import LMDPipeline


def scene_targets(tokenizer, layout: Layout, *, by_group: bool = True) -> list[EnergyTarget]:
    """One energy target per object: its group's tokens in the scene prompt, its own box, and
    the boxes of every object of its group (a group's phrase may attend to any of them).
    ``by_group`` (``phrase_groups="group"``, the reference): the tokens include the group's count
    word and the loss weighs each group once (:func:`grounded_sd.guidance.grouped_mean`)."""
    groups = group_phrases(layout)
    group_tokens = scene_token_indices(tokenizer, layout.background, groups, count_words=by_group)
    group_of = {oid: g for g in groups for oid in g.object_ids}
    return [
        EnergyTarget(
            o.id, group_tokens[group_of[o.id].phrase], o.box, tuple(layout.object(i).box for i in group_of[o.id].object_ids),
            group=group_of[o.id].phrase if by_group else "",
        )
        for o in layout.objects
    ]


def gligen_phrases(layout: Layout, rule: str = "group") -> list[str]:
    """The GLIGEN phrase of each object in the final pass (§2.8): under ``"group"`` an object of a
    duplicated phrase gets its group's words with the count ("two apples"), as the reference's
    flattened ``overall_phrases`` (generation/lmd_plus.py:463-467, utils/parse.py:339-349);
    under ``"object"`` its own phrase."""
    if rule == "object":
        return [o.phrase for o in layout.objects]
    words = {oid: f"{g.count_word} {g.text}".strip() for g in group_phrases(layout) for oid in g.object_ids}
    return [words[o.id] for o in layout.objects]


def run_final_pass(
    pipe: LMDPipeline, run: Run, layout: Layout, text: TextEmbeddings, frozen: FrozenForeground, per_box: PerBoxResult,
    *, plus: bool, report: GenerationReport, intermediates: Intermediates,
) -> tuple[torch.Tensor, GuidanceTrace]:
    """The final latent, and the pass's guidance trace."""
    options, objects = run.options, layout.objects
    transfer = options.transfer_weight > 0 and options.guided_steps() > 0
    groups = group_phrases(layout)
    spans = scene_phrase_spans(layout.background, groups)  # where each phrase is, for per-token connectors
    group_of = {oid: g.phrase for g in groups for oid in g.object_ids}
    targets = pipe.token_positions(lambda tokenizer: scene_targets(tokenizer, layout, by_group=options.phrase_groups == "group"))
    targets = guidance_targets(text.conditioned, "final", targets, [0] * len(objects), [spans[group_of[o.id]] for o in objects])
    trace = GuidanceTrace()
    guidance = Guidance(targets, trace, pipe.energy_threshold(options, run.layers), per_box.reference_maps if transfer else None)
    gligen = pipe._gligen_inputs([[o.box for o in objects]], [gligen_phrases(layout, options.gligen_phrases)]) if plus else None
    with pipe._stage(run, "final", options.steps):
        out = denoise(
            run, pipe._scheduler(options.steps), "final", frozen.composed[0], text, options.steps,
            guidance=guidance, frozen=frozen, gligen=gligen, noise_keys=[""],
        )
    intermediates.final_latents = torch.stack(out.trajectory).float().cpu()
    for obj, energy in zip(report.objects, pass_energies(trace, targets)):
        obj.final_energy = energy
    return out.trajectory[-1], trace
