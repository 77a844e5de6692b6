"""The layout-grounded controller over a frozen Stable Diffusion (METHOD.md §2).

``LMDPipeline.__call__`` reads top to bottom: check inputs, encode prompts, prepare noise,
the per-box pass (§2.3), masks (§2.4), composition (§2.5), the final pass (§2.6), decode and
report. The parts it composes live beside it: attention capture (attention.py), the energy
and backward guidance (guidance.py), noise and composition (compose.py), prompts
(prompts.py), masks (masks.py), counters and the report.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from grounded_sd.attention import AttentionRecorder, ForwardStopped, box_mask, map_shape, recording_attention, resolve_attention_layers, token_maps
from grounded_sd.compose import box_noise, compose_latents, mask_to_latent, object_seed, seeded_noise, step_noise_seed
from grounded_sd.counters import UNetCalls, UNetCounter
from grounded_sd.errors import GenerationCanceled, GroundedSDError, InvalidLayoutError, NonFiniteLatents, VariantUnavailable
from grounded_sd.guidance import EnergyTarget, GuidanceTrace, guidance_step_size, guide_latents, object_energy, transfer_loss
from grounded_sd.masks import load_sam_predictor, object_mask
from grounded_sd.options import LMDOptions
from grounded_sd.prompts import (
    group_phrases,
    join_negative,
    object_prompt,
    object_token_indices,
    scene_prompt,
    scene_token_indices,
)
from grounded_sd.report import GenerationReport, GenerationResult, Intermediates, ObjectReport, PassEnergy, StageReport
from layout_planner.draw import draw_layout
from layout_planner.layout import Layout

Variant = Literal["lmd", "sd", "lmd_plus"]
VARIANTS = ("lmd", "sd", "lmd_plus")
ProgressFn = Callable[[str, int, int], None]
GLIGEN_MAX_OBJECTS = 30
REFERENCE_HEADS = 8  # SD 1.5's heads per cross-attention: the scale of the reference's loss threshold


class ModelLoadError(GroundedSDError):
    """The diffusion model cannot be loaded (missing directory, missing component, unknown scheduler)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return table[dtype]


def _scheduler_class(name: str):
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelLoadError(f"unknown scheduler {name!r}: expected a diffusers scheduler class name such as DDIMScheduler")
    return cls


def check_one_call_per_step(scheduler, steps: int = 10) -> None:
    """LMD's bookkeeping (per-step latents for composition, frozen steps, guidance per step)
    needs one UNet call per denoising step. Second-order schedulers (Heun, KDPM2) and PNDM run
    more timesteps than steps; looping over ``steps`` of them would stop before the image is
    denoised, so they are refused with a :class:`ModelLoadError` that says so."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps)
    if len(probe.timesteps) != steps:
        raise ModelLoadError(
            f"scheduler {type(scheduler).__name__} takes {len(probe.timesteps)} model calls for {steps} steps; "
            "LMD needs one per step: choose DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, "
            "DPMSolverMultistepScheduler, UniPCMultistepScheduler or DDPMScheduler"
        )


@dataclass
class _Run:
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

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise GenerationCanceled("generation canceled")


@dataclass
class _PassOutput:
    trajectory: list[torch.Tensor]  # latents before step 0 and after every step
    last_pred_x0: torch.Tensor | None


class LMDPipeline:
    """LLM-grounded diffusion's stage 2 on a frozen SD 1.x/2.x; load once, call many times."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, sam_predictor=None) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.sam_predictor = sam_predictor
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def supports_gligen(self) -> bool:
        return getattr(self.unet.config, "attention_type", "default") == "gated" and hasattr(self.unet, "position_net")

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        scheduler: str = "DDIMScheduler",
        sam_checkpoint: str | Path | None = None,
        sam_model_type: str = "vit_h",
    ) -> "LMDPipeline":
        """Load UNet, VAE, CLIP text encoder and tokenizer, and the scheduler from a hub id or a
        local diffusers directory; optionally a SAM checkpoint for mask refinement (§2.4)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        scheduler_cls = _scheduler_class(scheduler)
        source = str(model)
        local = Path(source).expanduser()
        if local.exists():
            missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (local / part).is_dir()]
            if missing:
                listed = ", ".join(f"{part}/" for part in missing)
                raise ModelLoadError(f"{local} is not a diffusers Stable Diffusion directory: missing {listed}")
            source = str(local)
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch_dtype)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            noise_scheduler = scheduler_cls.from_pretrained(source, subfolder="scheduler")
            check_one_call_per_step(noise_scheduler)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the diffusion model {source!r}: {exc}".splitlines()[0]) from exc
        predictor = load_sam_predictor(sam_checkpoint, sam_model_type, str(torch_device)) if sam_checkpoint else None
        return cls(unet.to(torch_device), vae.to(torch_device), text_encoder.to(torch_device), tokenizer, noise_scheduler, predictor)

    # ------------------------------------------------------------------------------------------
    def __call__(
        self,
        layout: Layout | dict[str, Any],
        *,
        seed: int,
        options: LMDOptions | None = None,
        variant: Variant = "lmd",
        width: int = 512,
        height: int = 512,
        negative_prompt: str | None = None,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        started = time.perf_counter()
        options = options or LMDOptions.reference()

        # 1. Check inputs
        layout = self.check_inputs(layout, options=options, variant=variant, width=width, height=height)
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        check_one_call_per_step(self.scheduler, options.steps)
        try:
            layers = resolve_attention_layers(self.unet, options.attention_layers)
        except ValueError as exc:
            raise InvalidLayoutError(f"options.attention_layers: {exc}") from exc

        # 2. Encode prompts (§2.3, §2.6)
        groups = group_phrases(layout)
        prompt = scene_prompt(layout.background, groups)
        negative = join_negative(layout.negative, negative_prompt, options.default_negative)
        cond, uncond = self._encode([prompt]), self._encode([negative])
        report = GenerationReport(
            variant=variant, seed=seed, width=width, height=height, steps=options.steps, prompt=prompt,
            negative_prompt=negative, attention_layers=layers, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            options=options.model_dump(mode="json"),
            objects=[ObjectReport(id=o.id, phrase=o.phrase, box=o.box) for o in layout.objects],
        )
        if variant != "sd" and not layout.objects:
            report.notes.append(f"the layout has no objects: rendered the background as plain SD instead of {variant}")

        # 3. Prepare noise: background from the job seed, each object's from (seed, id) (§2.7)
        channels = self.unet.config.in_channels
        background = seeded_noise((1, channels, *latent_hw), seed, self.device, self.dtype)

        with recording_attention(self.unet, layers) as recorder, torch.no_grad():
            run = _Run(
                options=options, latent_hw=latent_hw, layers=layers, recorder=recorder, counter=UNetCounter(self.unet),
                progress=progress or (lambda stage, step, total: None), should_cancel=should_cancel or (lambda: False),
                seed=seed, init_sigma=float(self._scheduler(options.steps).init_noise_sigma),
            )
            intermediates = Intermediates(object_ids=[o.id for o in layout.objects])
            if variant == "sd" or not layout.objects:
                # The baseline (§2.8): plain SD with the layout's prompt and negative prompt.
                with self._stage(run, "sd", options.steps):
                    out = self._denoise(run, "sd", background * run.init_sigma, cond, uncond, options.steps, noise_keys=[""])
                final_latents, masks = out.trajectory[-1], {}
                intermediates.final_latents = torch.stack(out.trajectory).float().cpu()
            else:
                final_latents, masks = self._grounded(run, layout, seed, background, cond, uncond, variant, report, intermediates)

            # 8. Decode, overlay, report
            image = self._decode(final_latents, options.max_batch)[0]
        report.notes += run.notes
        report.stages = run.stages
        report.unet_total = run.counter.total()
        report.wall_s = time.perf_counter() - started
        overlay = draw_layout(layout, image)
        return GenerationResult(image=image, overlay=overlay, masks=masks, layout=layout, report=report, intermediates=intermediates)

    def _grounded(
        self, run: _Run, layout: Layout, seed: int, background: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
        variant: Variant, report: GenerationReport, intermediates: Intermediates,
    ) -> tuple[torch.Tensor, dict[str, Image.Image]]:
        """Steps 4-7 of ``__call__`` for ``lmd`` and ``lmd_plus``."""
        options, objects = run.options, layout.objects
        n = len(objects)
        h, w = run.latent_hw
        plus = variant == "lmd_plus"
        final_guided = options.guided_steps()
        transfer = options.transfer_weight > 0 and final_guided > 0
        per_box_steps = self.per_box_steps(options)
        mask_first = min(options.mask_first_step(), per_box_steps - 1)
        report.per_box_steps = per_box_steps

        # 4. Per-box pass: all objects x CFG in one batch per step (§2.3)
        prompts = [object_prompt(layout.background, o.phrase) for o in objects]
        report.per_box_prompts = {o.id: p for o, p in zip(objects, prompts)}
        box_cond = self._encode(prompts)
        box_uncond = self._encode([join_negative(options.single_object_negative, layout.negative, options.default_negative)]).expand(n, -1, -1)
        box_targets = [EnergyTarget(o.id, object_token_indices(self.tokenizer, layout.background, o.phrase), o.box, (o.box,)) for o in objects]
        foreground = torch.cat([seeded_noise((1, *background.shape[1:]), object_seed(seed, o.id), self.device, self.dtype) for o in objects])
        box_masks = torch.stack([box_mask(o.box, h, w, self.device) for o in objects])[:, None]
        initial = box_noise(background, foreground, box_masks, options.box_noise_ratio) * run.init_sigma

        reference_maps: dict[int, dict[str, torch.Tensor]] = {}  # step -> layer -> (N, heads, h*w)
        mask_sum: torch.Tensor | float = 0.0  # (N, h, w) at the attention map's own resolution
        mask_count = 0

        def capture_per_box(step: int) -> list[str]:
            return run.layers if (transfer and step < final_guided) or step >= mask_first else []

        def collect_per_box(step: int, maps: dict[str, torch.Tensor]) -> None:
            nonlocal mask_sum, mask_count
            cond_maps = {layer: probs[n:] for layer, probs in maps.items()}  # rows: uncond..., cond...
            per_object = {
                layer: torch.stack([token_maps(probs[i], [t.object_token if t.object_token is not None else 0]) for i, t in enumerate(box_targets)])
                for layer, probs in cond_maps.items()
            }
            if transfer and step < final_guided:
                reference_maps[step] = per_object
            if step >= mask_first:
                mask_sum = mask_sum + self._mask_layer_mean(per_object, run.latent_hw)
                mask_count += 1

        per_box_trace = GuidanceTrace()
        gligen_box = self._gligen_inputs([[o.box] for o in objects], [[o.phrase] for o in objects]) if plus else None
        with self._stage(run, "per_box", per_box_steps):
            out = self._denoise(
                run, "per_box", initial, box_cond, box_uncond, per_box_steps,
                guidance=None if plus else (box_targets, per_box_trace, None),
                capture=capture_per_box, collect=collect_per_box, gligen=gligen_box, noise_keys=[o.id for o in objects],
            )
        per_box = torch.stack(out.trajectory)
        intermediates.per_box_latents = per_box.float().cpu()
        for obj, target, energy in zip(report.objects, box_targets, _pass_energies(per_box_trace, box_targets)):
            obj.per_box_energy, obj.token_count = energy, len(target.token_indices)
            if not target.token_indices:
                run.notes.append(f"{obj.id}: the phrase falls past the tokenizer's limit; no guidance, box-like mask")

        # 5. Masks: aggregated attention refined by SAM, with fallbacks (§2.4)
        masks: dict[str, Image.Image] = {}
        latent_masks = []
        with self._stage(run, "masks", n):
            shortened = per_box_steps < options.steps
            images_source = out.last_pred_x0 if shortened and out.last_pred_x0 is not None else per_box[-1]
            if shortened:
                source = "its x0-prediction" if out.last_pred_x0 is not None else "its latent (the scheduler gives no x0-prediction)"
                run.notes.append(f"per-box pass stopped at step {per_box_steps} of {options.steps}; masks segmented on {source}")
            per_box_images = self._decode(images_source, options.max_batch)
            attention = mask_sum / max(mask_count, 1)
            for index, (obj, image) in enumerate(zip(objects, per_box_images)):
                run.check_cancel()
                result = object_mask(
                    np.asarray(image), attention[index].float().cpu().numpy(), obj.box,
                    predictor=self.sam_predictor, prompt="box" if plus else "point", options=options.masks,
                )
                masks[obj.id] = Image.fromarray(result.mask.astype(np.uint8) * 255, mode="L")
                cells = mask_to_latent(torch.from_numpy(result.mask), h, w).to(self.device)
                latent_masks.append(cells)
                entry = report.objects[index]
                entry.mask_source, entry.mask_detail = result.source, result.detail
                entry.mask_area = float(result.mask.mean())
                entry.mask_box_iou = _box_iou(result.mask, obj.box)
                intermediates.per_box_images[obj.id] = image
                intermediates.attention[obj.id] = attention[index].float().cpu()
                intermediates.latent_masks[obj.id] = cells.cpu()
                run.progress("masks", index + 1, n)

        # 6. Composition: largest mask first, so small objects end on top (§2.5)
        frozen_steps = options.frozen_steps()
        composed, owner = compose_latents(per_box[: frozen_steps + 1], torch.stack(latent_masks), background * run.init_sigma)
        intermediates.composed, intermediates.owner = composed.float().cpu(), owner.cpu()

        # 7. Final pass: frozen foreground, guidance on all objects, attention transfer (§2.6)
        groups = group_phrases(layout)
        group_tokens = scene_token_indices(self.tokenizer, layout.background, groups)
        group_of = {oid: g for g in groups for oid in g.object_ids}
        final_targets = [
            EnergyTarget(o.id, group_tokens[group_of[o.id].phrase], o.box, tuple(layout.object(i).box for i in group_of[o.id].object_ids))
            for o in objects
        ]
        final_trace = GuidanceTrace()
        gligen_final = self._gligen_inputs([[o.box for o in objects]], [[o.phrase for o in objects]]) if plus else None
        with self._stage(run, "final", options.steps):
            out = self._denoise(
                run, "final", composed[0], cond, uncond, options.steps,
                guidance=(final_targets, final_trace, reference_maps if transfer else None),
                frozen=(composed, owner > 0, frozen_steps), gligen=gligen_final, noise_keys=[""],
            )
        intermediates.final_latents = torch.stack(out.trajectory).float().cpu()
        for obj, energy in zip(report.objects, _pass_energies(final_trace, final_targets)):
            obj.final_energy = energy
        for name, trace in (("per-box", per_box_trace), ("final", final_trace)):
            if trace.nonfinite_rows:
                run.notes.append(
                    f"{name} pass: {trace.nonfinite_rows} guidance update(s) skipped because the gradient was not finite "
                    "(low-precision overflow); try dtype float32 or bfloat16"
                )
        return out.trajectory[-1], masks

    # ------------------------------------------------------------------------------------------
    def check_inputs(self, layout: Layout | dict[str, Any], *, options: LMDOptions, variant: str, width: int, height: int) -> Layout:
        """A valid :class:`Layout`, or an :class:`InvalidLayoutError` that names the problem."""
        if variant not in VARIANTS:
            raise InvalidLayoutError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if variant == "lmd_plus" and not self.supports_gligen:
            raise VariantUnavailable("variant lmd_plus needs a GLIGEN UNet (attention_type 'gated'); the loaded model has none")
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % 8 or value % self.vae_scale_factor:
                raise InvalidLayoutError(f"{name} must be a positive multiple of {max(8, self.vae_scale_factor)}, got {value!r}")
        if not isinstance(layout, Layout):
            try:
                layout = Layout.model_validate(layout)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"]) or "layout"
                raise InvalidLayoutError(f"invalid layout at {where}: {first['msg']}") from exc
        if len(layout.objects) > options.max_objects:
            raise InvalidLayoutError(f"the layout has {len(layout.objects)} objects; at most {options.max_objects} are allowed")
        if variant == "lmd_plus" and len(layout.objects) > GLIGEN_MAX_OBJECTS:
            raise InvalidLayoutError(f"lmd_plus takes at most {GLIGEN_MAX_OBJECTS} objects")
        return layout

    def energy_threshold(self, options: LMDOptions, layers: list[str]) -> float:
        """``loss_threshold`` is on the reference's scale, a sum over SD 1.5's 8 heads; the energy
        here sums over this UNet's heads, so the threshold scales by (mean heads of the layers) / 8."""
        modules = dict(self.unet.named_modules())
        heads = sum(modules[name].heads for name in layers) / len(layers)
        return options.loss_threshold * heads / REFERENCE_HEADS

    @staticmethod
    def per_box_steps(options: LMDOptions) -> int:
        """Steps the per-box pass runs: all of them (reference), or only what composition (the
        frozen steps), attention transfer (the guided steps) and mask aggregation use."""
        if options.per_box_full_pass:
            return options.steps
        needed = max(options.frozen_steps(), options.guided_steps() if options.transfer_weight > 0 else 0, options.mask_first_step() + 1)
        return max(1, min(options.steps, needed))

    # --- the denoising loop shared by the three passes ------------------------------------------
    def _denoise(
        self,
        run: _Run,
        stage: str,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        n_steps: int,
        *,
        guidance: tuple[list[EnergyTarget], GuidanceTrace, dict | None] | None = None,
        capture: Callable[[int], list[str]] | None = None,
        collect: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
        frozen: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        gligen: dict[str, torch.Tensor] | None = None,
        noise_keys: list[str] | None = None,
    ) -> _PassOutput:
        """Run ``n_steps`` of a fresh scheduler over a batch of latents (one row per object in the
        per-box pass, one row otherwise). Per step: backward guidance (§2.2), one CFG forward
        over all rows (chunked by ``max_batch``), the scheduler step, the frozen foreground (§2.6).

        Stochastic schedulers (Euler ancestral, DDPM, DDIM with eta > 0, SDE solvers) draw their
        step noise from one CPU generator per row, seeded from (job seed, ``noise_keys[row]``):
        an object's id in the per-box pass, so its noise does not depend on the other objects (§2.7)."""
        options = run.options
        scheduler = self._scheduler(options.steps)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            keys = noise_keys or [""] * latents.shape[0]
            step_kwargs["generator"] = [torch.Generator("cpu").manual_seed(step_noise_seed(run.seed, key)) for key in keys]
        gligen_steps = options.gligen_steps()
        last_guided = options.guided_steps() - 1
        trajectory, pred_x0 = [latents], None
        for i, t in enumerate(scheduler.timesteps[:n_steps]):
            run.check_cancel()
            step_gligen = gligen if gligen is not None and i < gligen_steps else None

            # a. backward guidance toward the boxes
            iterations = options.iterations_at(i) if guidance is not None else 0
            if iterations:
                targets, trace, reference = guidance
                loss_fn = self._loss_fn(run, targets, reference.get(i) if reference else None, final=stage == "final")
                forward = self._attention_forward(run, t, scheduler, cond, step_gligen)
                latents = guide_latents(
                    latents, iterations=iterations, step_size=guidance_step_size(scheduler, t, i), scale=options.loss_scale,
                    threshold=self.energy_threshold(options, run.layers), forward=forward, loss_fn=loss_fn, counter=run.counter,
                    max_batch=options.max_batch, trace=trace, stop=options.guidance_stop, check_cancel=run.check_cancel,
                )
                if options.energy_checks and i in (0, last_guided):  # the energy after this step's updates, for the report
                    measured: dict[str, float] = {}
                    chunk = options.max_batch or latents.shape[0]
                    for start in range(0, latents.shape[0], chunk):
                        rows = list(range(start, min(start + chunk, latents.shape[0])))
                        for energies in loss_fn(forward(latents[rows], rows), rows)[1]:
                            measured.update(energies)
                    if i == 0:
                        trace.after_first_step.update(measured)
                    if i == last_guided:
                        trace.last.update(measured)

            # b. classifier-free guided noise prediction, capturing maps where asked
            with run.recorder.capture(capture(i) if capture else []):
                noise = self._predict_noise(run, scheduler, latents, t, cond, uncond, step_gligen)
                if collect is not None:
                    collect(i, run.recorder.maps())
            run.recorder.clear()

            # c. scheduler step, then the frozen foreground of the composition
            step = scheduler.step(noise, t, latents, **step_kwargs)
            pred_x0 = getattr(step, "pred_original_sample", None)
            if pred_x0 is None and i == n_steps - 1:  # only the last step's is used (fast preset's masks)
                pred_x0 = _x0_prediction(scheduler, latents, noise, t)
            latents = step.prev_sample.to(self.dtype)
            if frozen is not None and i < frozen[2]:
                composed, foreground, _ = frozen
                latents = torch.where(foreground, composed[i + 1], latents)
            trajectory.append(latents)
            run.progress(stage, i + 1, n_steps)
        if not bool(torch.isfinite(latents).all()):
            hint = "use dtype float32 or bfloat16" if self.dtype == torch.float16 else "check the model's weights"
            raise NonFiniteLatents(f"the {stage} pass produced NaN or infinite latents in {str(self.dtype).removeprefix('torch.')}; {hint}")
        return _PassOutput(trajectory, pred_x0)

    def _predict_noise(self, run: _Run, scheduler, latents, t, cond, uncond, gligen) -> torch.Tensor:
        rows = latents.shape[0]
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        embeddings = torch.cat([uncond.expand(rows, -1, -1), cond.expand(rows, -1, -1)])
        if gligen is not None:
            gligen = {key: torch.cat([value, value]) for key, value in gligen.items()}
            gligen["masks"][:rows] = 0  # the unconditional half sees no grounding (as diffusers' GLIGEN)
        chunk = run.options.max_batch or 2 * rows
        parts = []
        for start in range(0, 2 * rows, chunk):
            part = slice(start, start + chunk)
            kwargs = {"gligen": {k: v[part] for k, v in gligen.items()}} if gligen is not None else None
            parts.append(run.counter.forward(model_input[part], t, embeddings[part], kwargs))
        noise_uncond, noise_cond = torch.cat(parts).chunk(2)
        return noise_uncond + run.options.guidance_scale * (noise_cond - noise_uncond)

    def _attention_forward(self, run: _Run, t, scheduler, cond, gligen) -> Callable[[torch.Tensor, list[int]], dict[str, torch.Tensor]]:
        """The conditional forward of guidance: explicit softmax on the guided layers only, and
        the UNet stops after the last of them (what follows cannot change the energy)."""

        def forward(latents: torch.Tensor, rows: list[int]) -> dict[str, torch.Tensor]:
            kwargs = {"gligen": {k: v[rows] for k, v in gligen.items()}} if gligen is not None else None
            embeddings = cond[rows] if cond.shape[0] > 1 else cond.expand(len(rows), -1, -1)
            with run.recorder.capture(run.layers, stop_when_captured=True):
                try:
                    run.counter.forward(scheduler.scale_model_input(latents, t), t, embeddings, kwargs)
                except ForwardStopped:
                    pass
                maps = run.recorder.maps()
            run.recorder.clear()
            return maps

        return forward

    def _loss_fn(self, run: _Run, targets: list[EnergyTarget], reference: dict[str, torch.Tensor] | None, *, final: bool):
        """Per-box pass: row i is object i alone. Final pass: one row, every object, plus attention transfer."""
        options, hw, layers = run.options, run.latent_hw, run.layers

        def energy_of(probs: torch.Tensor, target: EnergyTarget) -> torch.Tensor:
            return sum(object_energy(probs[layer], target, hw, options.topk_fraction, options.background_weight) for layer in layers) / len(layers)

        def loss_fn(maps: dict[str, torch.Tensor], rows: list[int]) -> tuple[torch.Tensor, list[dict[str, float]]]:
            if not final:
                energies = [energy_of({l: maps[l][j] for l in layers}, targets[row]) for j, row in enumerate(rows)]
                return torch.stack(energies), [{targets[row].object_id: float(e.detach())} for row, e in zip(rows, energies)]
            probs = {l: maps[l][0] for l in layers}
            energies = [energy_of(probs, target) for target in targets]
            loss = torch.stack(energies).mean()
            if reference is not None:
                moved = [
                    transfer_loss(probs[l], target, reference[l][k], hw)
                    for k, target in enumerate(targets)
                    for l in layers
                ]
                loss = loss + options.transfer_weight * torch.stack(moved).mean()
            return loss[None], [{t.object_id: float(e.detach()) for t, e in zip(targets, energies)}]

        return loss_fn

    # --- small parts -----------------------------------------------------------------------------
    def _scheduler(self, steps: int):
        """A fresh copy of the loaded scheduler with its timesteps set: some values (Euler's
        ``init_noise_sigma`` with "leading" spacing) are only right once the timesteps are known."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def _mask_layer_mean(self, per_object: dict[str, torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
        """Mean over heads and over the highest-resolution guided layers, at that resolution (§2.4):
        the mask code smooths in these pixels (the unit of ``MaskOptions.smooth_sigma``) before resizing."""
        cells = max(maps.shape[-1] for maps in per_object.values())
        chosen = [maps for maps in per_object.values() if maps.shape[-1] == cells]
        h, w = map_shape(cells, latent_hw)
        return torch.stack(chosen).mean(dim=0).mean(dim=1).float().view(-1, h, w)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def _gligen_inputs(self, boxes: list[list[tuple]], phrases: list[list[str]]) -> dict[str, torch.Tensor]:
        """GLIGEN's grounding tokens (§2.8): per row up to 30 boxes, phrase embeddings, presence masks."""
        rows, dim = len(boxes), self.unet.config.cross_attention_dim
        out_boxes = torch.zeros(rows, GLIGEN_MAX_OBJECTS, 4, device=self.device, dtype=self.dtype)
        embeddings = torch.zeros(rows, GLIGEN_MAX_OBJECTS, dim, device=self.device, dtype=self.dtype)
        present = torch.zeros(rows, GLIGEN_MAX_OBJECTS, device=self.device, dtype=self.dtype)
        for row, (row_boxes, row_phrases) in enumerate(zip(boxes, phrases)):
            tokens = self.tokenizer(row_phrases, padding=True, truncation=True, return_tensors="pt").to(self.device)
            pooled = self.text_encoder(**tokens).pooler_output.to(self.dtype)
            count = len(row_boxes)
            out_boxes[row, :count] = torch.tensor(row_boxes, device=self.device, dtype=self.dtype)
            embeddings[row, :count] = pooled
            present[row, :count] = 1
        return {"boxes": out_boxes, "positive_embeddings": embeddings, "masks": present}

    def _decode(self, latents: torch.Tensor, max_batch: int | None) -> list[Image.Image]:
        config = self.vae.config
        scaled = latents.to(self.vae.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None):
            scaled = scaled + config.shift_factor
        chunk = max_batch or scaled.shape[0]
        pixels = torch.cat([self.vae.decode(scaled[s : s + chunk]).sample for s in range(0, scaled.shape[0], chunk)])
        arrays = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in arrays]

    @contextlib.contextmanager
    def _stage(self, run: _Run, name: str, steps: int) -> Iterator[None]:
        """Count UNet calls under ``name`` and record the stage's wall time."""
        run.counter.stage = name
        started = time.perf_counter()
        yield
        calls = run.counter.by_stage.get(name, UNetCalls())
        run.stages.append(StageReport(name=name, wall_s=time.perf_counter() - started, steps=steps, unet=calls))


def _x0_prediction(scheduler, latents: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor | None:
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


def _box_iou(mask: np.ndarray, box: tuple[float, float, float, float]) -> float:
    height, width = mask.shape
    x0, y0, x1, y1 = box
    region = np.zeros_like(mask, dtype=bool)
    px0, py0 = int(x0 * width), int(y0 * height)
    region[py0 : max(py0 + 1, round(y1 * height)), px0 : max(px0 + 1, round(x1 * width))] = True
    union = np.logical_or(mask, region).sum()
    return float(np.logical_and(mask, region).sum() / union) if union else 0.0


def _pass_energies(trace: GuidanceTrace, targets: list[EnergyTarget]) -> list[PassEnergy]:
    return [
        PassEnergy(
            start=trace.first.get(t.object_id),
            after_first_step=trace.after_first_step.get(t.object_id),
            end=trace.last.get(t.object_id),
            iterations=trace.iterations,
        )
        for t in targets
    ]
