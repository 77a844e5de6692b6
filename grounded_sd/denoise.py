"""The denoising loop shared by the three passes: plain SD, the per-box pass, the final pass.

:func:`denoise` runs one pass over a batch of latents. Per step: backward guidance toward the
boxes (docs/method.md §2.2), one classifier-free-guided forward over all rows, the scheduler step,
and, in the final pass, the frozen foreground of the composition (§2.6). What a pass adds to
that loop comes in as small named records: :class:`Guidance`, :class:`MapCapture`,
:class:`FrozenForeground`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from grounded_sd.attention import AttentionRecorder, ForwardStopped
from grounded_sd.compose import step_noise_seed
from grounded_sd.conditioning.base import Conditioned, Pass
from grounded_sd.counters import UNetCounter
from grounded_sd.errors import GenerationCanceled, NonFiniteLatents
from grounded_sd.guidance import (
    EnergyTarget,
    GuidanceTrace,
    LossFn,
    grouped_mean,
    guidance_step_size,
    guide_latents,
    object_energy,
    transfer_loss,
)
from grounded_sd.options import LMDOptions
from grounded_sd.previews import PreviewFn, per_box_preview, preview_interval, scene_preview
from grounded_sd.report import PassEnergy, StageReport

ProgressFn = Callable[[str, int, int], None]
AttentionForward = Callable[[torch.Tensor, list[int]], dict[str, torch.Tensor]]
LayerMaps = dict[str, torch.Tensor]
"""Layer name -> attention maps of that layer."""


@dataclass
class Run:
    """Per-call state of one generation (nothing survives the call)."""

    options: LMDOptions
    latent_hw: tuple[int, int]
    layers: list[str]
    recorder: AttentionRecorder
    counter: UNetCounter
    progress: ProgressFn
    should_cancel: Callable[[], bool]
    notes: list[str] = field(default_factory=list)
    stages: list[StageReport] = field(default_factory=list)
    seed: int = 0
    init_sigma: float = 1.0  # the scheduler's initial noise scale at ``options.steps`` steps
    preview: PreviewFn | None = None  # live previews, only when the caller asked for them
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # where per-box previews show each object
    time_ids: torch.Tensor | None = None
    """SDXL's (1, 6) size and crop conditioning (original h, w; crop top, left; target h, w), the
    same for every row of every UNet call of the generation; None for SD 1.x/2.x."""

    def added_conditions(self, text_embeds: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` for rows whose pooled embeddings are ``text_embeds``; None
        for SD 1.x/2.x (``text_embeds`` None)."""
        if text_embeds is None:
            return None
        return {"text_embeds": text_embeds, "time_ids": self.time_ids.expand(text_embeds.shape[0], -1)}

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise GenerationCanceled("generation canceled")


@dataclass
class TextEmbeddings:
    """A pass's view of the generation's text conditioning (grounded_sd.conditioning): the
    embeddings guidance's forwards read (CLIP, where the phrase token positions are) and those
    the classifier-free guided forward denoises with, at each timestep."""

    conditioned: Conditioned
    which: Pass

    def guidance(self, t) -> torch.Tensor:
        return self.conditioned.guidance(self.which, t)

    def denoising(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond): one row, or one per latent row (cond); computed once per step."""
        return self.conditioned.denoising(self.which, t)

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """SDXL's (cond, uncond) pooled embeddings of the pass (CLIP's, as the pass's prompts), or None."""
        return self.conditioned.clip.pooled_pair(self.which)

    def maps_from_denoising(self, t) -> bool:
        """Whether the CFG forward attends to the guidance embeddings (phrase maps can be read from it)."""
        return self.conditioned.denoises_with_guidance_embeddings(self.which, t)


@dataclass
class Guidance:
    """Backward guidance of a pass (§2.2): whom to guide, where to record energies, and the
    per-box pass's maps that attention transfer pulls toward (final pass only; step -> layer -> maps)."""

    targets: list[EnergyTarget]
    trace: GuidanceTrace
    threshold: float
    reference: dict[int, LayerMaps] | None = None


@dataclass
class MapCapture:
    """Which layers to capture at a step, and what to do with the captured maps (the
    conditional rows', one per latent row)."""

    layers_at: Callable[[int], list[str]]
    collect: Callable[[int, LayerMaps], None]


@dataclass
class FrozenForeground:
    """The composition the final pass keeps inside the masks for its first ``steps`` steps (§2.6)."""

    composed: torch.Tensor  # (steps+1, 1, C, h, w): the composed latent before step 0 and after every step
    foreground: torch.Tensor  # (h, w) bool: cells that belong to some object
    steps: int


@dataclass
class PassOutput:
    trajectory: list[torch.Tensor]  # latents before step 0 and after every step
    last_pred_x0: torch.Tensor | None


def denoise(
    run: Run,
    scheduler,
    stage: str,
    latents: torch.Tensor,
    text: TextEmbeddings,
    n_steps: int,
    *,
    guidance: Guidance | None = None,
    capture: MapCapture | None = None,
    frozen: FrozenForeground | None = None,
    gligen: dict[str, torch.Tensor] | None = None,
    noise_keys: list[str] | None = None,
) -> PassOutput:
    """Run ``n_steps`` of ``scheduler`` (fresh, timesteps set) over a batch of latents: one row
    per object in the per-box pass, one row otherwise.

    Stochastic schedulers (Euler ancestral, DDPM, DDIM with eta > 0, SDE solvers) draw their
    step noise from one CPU generator per row, seeded from (job seed, ``noise_keys[row]``):
    an object's id in the per-box pass, so its noise does not depend on the other objects (§2.7)."""
    options, dtype = run.options, latents.dtype
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        keys = noise_keys or [""] * latents.shape[0]
        step_kwargs["generator"] = [torch.Generator("cpu").manual_seed(step_noise_seed(run.seed, key)) for key in keys]
    gligen_steps = options.gligen_steps()
    trajectory, pred_x0 = [latents], None
    for i, t in enumerate(scheduler.timesteps[:n_steps]):
        run.check_cancel()
        step_gligen = gligen if gligen is not None and i < gligen_steps else None

        # a. backward guidance toward the boxes
        if guidance is not None and options.iterations_at(i):
            latents = _guide_step(run, scheduler, i, t, latents, text, step_gligen, guidance, final=stage == "final")

        # b. classifier-free guided noise prediction, capturing the conditional rows' maps where asked
        cond, uncond = text.denoising(t)
        layers = capture.layers_at(i) if capture else []
        from_denoising = not layers or text.maps_from_denoising(t)
        with run.recorder.capture(layers if from_denoising else []):
            noise = predict_noise(run, scheduler, latents, t, cond, uncond, step_gligen, text.pooled())
            if capture is not None and layers and from_denoising:
                capture.collect(i, {layer: probs[latents.shape[0] :] for layer, probs in run.recorder.maps().items()})
        run.recorder.clear()
        if capture is not None and not from_denoising:
            # the CFG forward attended to the conditioning's tokens, which have no phrase positions: masks and
            # attention transfer read a CLIP-conditioned forward instead (stopped after the last guided layer)
            capture.collect(i, _guidance_maps(run, scheduler, t, latents, text, step_gligen))

        # c. scheduler step, then the frozen foreground of the composition
        step = scheduler.step(noise, t, latents, **step_kwargs)
        pred_x0 = getattr(step, "pred_original_sample", None)
        shown = pred_x0 if pred_x0 is not None else step.prev_sample
        if pred_x0 is None and i == n_steps - 1:  # only the last step's is used (fast preset's masks)
            pred_x0 = x0_prediction(scheduler, latents, noise, t)
        latents = step.prev_sample.to(dtype)
        if frozen is not None and i < frozen.steps:
            latents = torch.where(frozen.foreground, frozen.composed[i + 1], latents)
        trajectory.append(latents)
        run.progress(stage, i + 1, n_steps)
        if run.preview is not None and ((i + 1) % preview_interval(n_steps) == 0 or i + 1 == n_steps):
            image = per_box_preview(shown, run.boxes) if stage == "per_box" else scene_preview(shown[0])
            run.preview(stage, i + 1, n_steps, image)
    if not bool(torch.isfinite(latents).all()):
        hint = "use dtype float32 or bfloat16" if dtype == torch.float16 else "check the model's weights"
        raise NonFiniteLatents(f"the {stage} pass produced NaN or infinite latents in {str(dtype).removeprefix('torch.')}; {hint}")
    return PassOutput(trajectory, pred_x0)


def _guide_step(run: Run, scheduler, i: int, t, latents, text: TextEmbeddings, gligen, guidance: Guidance, *, final: bool) -> torch.Tensor:
    """This step's guidance iterations; with ``energy_checks``, the energy after the first and
    the last guided step's updates is measured again for the report."""
    options = run.options
    reference = guidance.reference.get(i) if guidance.reference else None
    loss_fn = energy_loss(run, guidance.targets, reference, final=final)
    if gligen is not None and options.guidance_grounding == "null":
        # the reference's guidance forward reads the unconditional half's zeroed presence masks
        # (models/pipelines.py:317 and 381-384): GLIGEN's null tokens, not the layout's
        gligen = {**gligen, "masks": torch.zeros_like(gligen["masks"])}
    forward = guidance_forward(run, t, scheduler, text, gligen)
    latents = guide_latents(
        latents, iterations=options.iterations_at(i), step_size=guidance_step_size(scheduler, t, i, options.step_size), scale=options.loss_scale,
        threshold=guidance.threshold, forward=forward, loss_fn=loss_fn, counter=run.counter,
        max_batch=options.max_batch, trace=guidance.trace, stop=options.guidance_stop, check_cancel=run.check_cancel,
    )
    last_guided = options.guided_steps() - 1
    if options.energy_checks and i in (0, last_guided):
        measured = _measure_energy(latents, forward, loss_fn, options.max_batch)
        if i == 0:
            guidance.trace.after_first_step.update(measured)
        if i == last_guided:
            guidance.trace.last.update(measured)
    return latents


def _guidance_maps(run: Run, scheduler, t, latents: torch.Tensor, text: TextEmbeddings, gligen) -> LayerMaps:
    """The guided layers' maps of every row under the guidance embeddings, chunked by ``max_batch``."""
    forward = guidance_forward(run, t, scheduler, text, gligen)
    rows = latents.shape[0]
    chunk = run.options.max_batch or rows
    parts = [forward(latents[s : s + chunk], list(range(s, min(s + chunk, rows)))) for s in range(0, rows, chunk)]
    return {layer: torch.cat([part[layer] for part in parts]) for layer in parts[0]}


def guidance_forward(run: Run, t, scheduler, text: TextEmbeddings, gligen) -> AttentionForward:
    """:func:`attention_forward` on the pass's guidance embeddings at ``t`` (and, on SDXL, the
    pooled embeddings of the same prompts)."""
    pooled = text.pooled()
    return attention_forward(run, t, scheduler, text.guidance(t), gligen, pooled[0] if pooled else None)


def _measure_energy(latents: torch.Tensor, forward: AttentionForward, loss_fn: LossFn, max_batch: int | None) -> dict[str, float]:
    measured: dict[str, float] = {}
    chunk = max_batch or latents.shape[0]
    for start in range(0, latents.shape[0], chunk):
        rows = list(range(start, min(start + chunk, latents.shape[0])))
        for energies in loss_fn(forward(latents[rows], rows), rows)[1]:
            measured.update(energies)
    return measured


def predict_noise(run: Run, scheduler, latents, t, cond, uncond, gligen, pooled=None) -> torch.Tensor:
    """One classifier-free-guided noise prediction over all rows, chunked by ``max_batch``;
    ``pooled``: SDXL's (cond, uncond) pooled embeddings, laid out in rows as the embeddings."""
    rows = latents.shape[0]
    model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
    embeddings = torch.cat([uncond.expand(rows, -1, -1), cond.expand(rows, -1, -1)])
    added = run.added_conditions(torch.cat([pooled[1].expand(rows, -1), pooled[0].expand(rows, -1)]) if pooled else None)
    if gligen is not None:
        gligen = {key: torch.cat([value, value]) for key, value in gligen.items()}
        gligen["masks"][:rows] = 0  # the unconditional half sees no grounding (as diffusers' GLIGEN)
    chunk = run.options.max_batch or 2 * rows
    parts = []
    for start in range(0, 2 * rows, chunk):
        part = slice(start, start + chunk)
        kwargs = {"gligen": {k: v[part] for k, v in gligen.items()}} if gligen is not None else None
        parts.append(run.counter.forward(model_input[part], t, embeddings[part], kwargs, added and {k: v[part] for k, v in added.items()}))
    noise_uncond, noise_cond = torch.cat(parts).chunk(2)
    return noise_uncond + run.options.guidance_scale * (noise_cond - noise_uncond)


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``rows`` of a per-row tensor, or its one row repeated."""
    return tensor[rows] if tensor.shape[0] > 1 else tensor.expand(len(rows), *tensor.shape[1:])


def attention_forward(run: Run, t, scheduler, cond, gligen, pooled: torch.Tensor | None = None) -> AttentionForward:
    """The conditional forward of guidance (``pooled``: SDXL's pooled embeddings of ``cond``'s
    prompts, passed with the time ids): explicit softmax on the guided layers only, and the UNet
    stops after the last of them (what follows cannot change the energy)."""

    def forward(latents: torch.Tensor, rows: list[int]) -> dict[str, torch.Tensor]:
        kwargs = {"gligen": {k: v[rows] for k, v in gligen.items()}} if gligen is not None else None
        added = run.added_conditions(_rows(pooled, rows) if pooled is not None else None)
        with run.recorder.capture(run.layers, stop_when_captured=True):
            try:
                run.counter.forward(scheduler.scale_model_input(latents, t), t, _rows(cond, rows), kwargs, added)
            except ForwardStopped:
                pass
            maps = run.recorder.maps()
        run.recorder.clear()
        return maps

    return forward


def energy_loss(run: Run, targets: list[EnergyTarget], reference: LayerMaps | None, *, final: bool) -> LossFn:
    """Per-box pass: row i is object i alone. Final pass: one row, every object, plus attention transfer."""
    options, hw, layers = run.options, run.latent_hw, run.layers

    def energy_of(probs: LayerMaps, target: EnergyTarget) -> torch.Tensor:
        return sum(
            object_energy(probs[layer], target, hw, options.topk_fraction, options.background_weight, options.box_cells) for layer in layers
        ) / len(layers)

    def loss_fn(maps: LayerMaps, rows: list[int]) -> tuple[torch.Tensor, list[dict[str, float]]]:
        if not final:
            energies = [energy_of({l: maps[l][j] for l in layers}, targets[row]) for j, row in enumerate(rows)]
            return torch.stack(energies), [{targets[row].object_id: float(e.detach())} for row, e in zip(rows, energies)]
        probs = {l: maps[l][0] for l in layers}
        energies = [energy_of(probs, target) for target in targets]
        loss = grouped_mean(energies, targets)
        if reference is not None:
            moved = [
                torch.stack([transfer_loss(probs[l], target, reference[l][k], hw, options.box_cells) for l in layers]).mean()
                for k, target in enumerate(targets)
            ]
            loss = loss + options.transfer_weight * grouped_mean(moved, targets)
        return loss[None], [{t.object_id: float(e.detach()) for t, e in zip(targets, energies)}]

    return loss_fn


def pass_energies(trace: GuidanceTrace, targets: list[EnergyTarget]) -> list[PassEnergy]:
    """The report's energies of each target in one pass."""
    return [
        PassEnergy(
            start=trace.first.get(t.object_id),
            after_first_step=trace.after_first_step.get(t.object_id),
            end=trace.last.get(t.object_id),
            iterations=trace.iterations,
        )
        for t in targets
    ]


def x0_prediction(scheduler, latents: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor | None:
    """The x0-prediction for schedulers whose step returns none (DPM-Solver multistep, UniPC):
    from the VP parameterisation ``z = sqrt(a) x0 + sqrt(1-a) eps`` and the model's prediction type."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        return None
    alpha = alphas[int(t)].to(device=latents.device, dtype=torch.float32)
    z, out = latents.float(), model_output.float()
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        x0 = (z - (1 - alpha).sqrt() * out) / alpha.sqrt()
    elif kind == "v_prediction":
        x0 = alpha.sqrt() * z - (1 - alpha).sqrt() * out
    elif kind == "sample":
        x0 = out
    else:
        return None
    return x0.to(latents.dtype)
