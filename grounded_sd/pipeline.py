"""The layout-grounded controller over a frozen Stable Diffusion (docs/method.md §2).

``LMDPipeline.__call__`` reads top to bottom as numbered steps: 1 check inputs, 2 encode
prompts, 3 prepare noise, 4 the per-box pass (per_box.py, §2.3), 5 masks (segment.py, §2.4),
6 composition (compose.py, §2.5), 7 the final pass (final_pass.py, §2.6), 8 decode and
report. Every pass runs the one denoising loop of denoise.py; attention capture lives in
attention.py, the energy and backward guidance in guidance.py, prompts in prompts.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError

from grounded_sd import sdxl
from grounded_sd.attention import recording_attention, resolve_attention_layers
from grounded_sd.compose import compose_latents, seeded_noise
from grounded_sd.conditioning.base import ClipConditioning, ClipEmbeddings, Conditioned, Conditioning, TextInputs
from grounded_sd.counters import UNetCalls, UNetCounter
from grounded_sd.denoise import FrozenForeground, ProgressFn, Run, TextEmbeddings, denoise
from grounded_sd.errors import (
    ConditioningUnavailable, InvalidLayoutError, InvalidOptions, InvalidSize, ModelLoadError, UnknownVariant, VariantUnavailable,
)
from grounded_sd.final_pass import run_final_pass
from grounded_sd.lora import LoraAdapters, LoraChoice, LoraUse
from grounded_sd.single_file import SUFFIXES as SINGLE_FILE_SUFFIXES
from grounded_sd.single_file import load_single_file
from grounded_sd.masks import load_sam_predictor
from grounded_sd.names import DTYPES, VARIANTS, Variant
from grounded_sd.options import LMDOptions
from grounded_sd.preflight import GLIGEN_ATTENTION
from grounded_sd.per_box import align_to_layout, box_negative, box_prompts, per_box_steps, run_per_box_pass
from grounded_sd.previews import PreviewFn, composed_preview
from grounded_sd.prompts import group_phrases, join_negative, scene_prompt
from grounded_sd.report import GenerationReport, GenerationResult, Intermediates, ObjectReport, StageReport
from grounded_sd.segment import segment_objects
from layout_planner.draw import draw_layout
from layout_planner.layout import Layout
from layout_planner.rescale import rescale_boxes

GLIGEN_MAX_OBJECTS = 30  # grounding tokens of GLIGEN's position net
REFERENCE_HEADS = 8  # SD 1.5's heads per cross-attention: the scale of the reference's loss threshold


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from exc


CPU_FLOAT16_REFUSED = (
    "dtype float16 is refused on a CPU: guidance's backward through the UNet runs 20-70x slower in float16 there "
    "than in float32; use float32, or bfloat16 on a CPU with bf16 instructions"
)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere. float16 on a CPU is a :class:`ModelLoadError`
    (:data:`CPU_FLOAT16_REFUSED`; benchmarks/cpu_precision.py measures why)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    if table[dtype] == torch.float16 and device.type == "cpu":
        raise ModelLoadError(CPU_FLOAT16_REFUSED)
    return table[dtype]


MODE_MEANINGS = {
    "replace": "guidance read CLIP's attention, the denoising forwards the conditioning's tokens",
    "concat": "guidance and denoising both read the conditioning's tokens before CLIP's",
    "tokens": "guidance and denoising both read the connector's own tokens (no CLIP)",
}
"""What a conditioning ``mode`` means, as the report's note says it (docs/conditioning.md)."""


def _scheduler_class(name: str):
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelLoadError(f"unknown scheduler {name!r}: expected a diffusers scheduler class name such as DDIMScheduler")
    return cls


def _sdxl_vae(vae, torch_dtype: torch.dtype):
    """An SDXL base's VAE in float32 when the model is float16 and the VAE's config asks
    (``force_upcast``, as diffusers' SDXL pipeline: SDXL 1.0's VAE overflows in fp16)."""
    if torch_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return vae.to(torch.float32)
    return vae


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


class LMDPipeline:
    """LLM-grounded diffusion's stage 2 on a frozen SD 1.x/2.x or SDXL base; load once, call many times.

    An SDXL base (a ``text_time`` UNet) comes with its second text encoder and tokenizer
    (``text_encoder_2``, ``tokenizer_2``; :mod:`grounded_sd.sdxl`)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, sam_predictor=None, *, text_encoder_2=None, tokenizer_2=None) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False) if text_encoder_2 is not None else None
        self.tokenizer_2 = tokenizer_2
        if self.is_sdxl:
            sdxl.check_components(unet, text_encoder, text_encoder_2)
            if tokenizer_2 is None:
                raise ModelLoadError("an SDXL base needs its tokenizer_2 beside text_encoder_2")
        self.scheduler = scheduler
        self.sam_predictor = sam_predictor
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.model_name = ""  # the hub id or directory it was loaded from (``from_pretrained`` sets it)
        self._adapters: LoraAdapters | None = None  # LoRA adapters, created on the first call that names one

    def use_loras(self, loras: Sequence[LoraChoice]) -> list[LoraUse]:
        """Make exactly ``loras`` active on the UNet and text encoder (each file loaded once per
        pipeline, then switched per call); an empty list turns every loaded adapter off."""
        if self._adapters is None:
            if not loras:
                return []
            self._adapters = LoraAdapters(self.unet, self.text_encoder)
        return self._adapters.use(loras)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_sdxl(self) -> bool:
        """An SDXL base: pooled text embeddings and size/crop time ids go with every UNet call."""
        return sdxl.is_sdxl_unet(self.unet.config)

    def token_positions(self, positions: Callable[[Any], Any]) -> Any:
        """``positions(tokenizer)``, e.g. a phrase's token indices; on SDXL computed with both
        tokenizers and checked to agree (:func:`grounded_sd.sdxl.shared_positions`)."""
        return sdxl.shared_positions([self.tokenizer, self.tokenizer_2] if self.is_sdxl else [self.tokenizer], positions)

    @property
    def supports_gligen(self) -> bool:
        return getattr(self.unet.config, "attention_type", "default") == GLIGEN_ATTENTION and hasattr(self.unet, "position_net")

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        scheduler: str = "DDIMScheduler",
        sam_checkpoint: str | Path | None = None,
        sam_model_type: str = "vit_b",
        single_file_config: str | None = None,
    ) -> "LMDPipeline":
        """Load UNet, VAE, CLIP text encoder and tokenizer, and the scheduler from a hub id, a
        local diffusers directory or a single SD 1.x/2.x/SDXL checkpoint file (``single_file_config``:
        where its configs and tokenizer are, see grounded_sd.single_file); optionally a SAM
        checkpoint for mask refinement (§2.4). An SDXL base directory (its ``model_index.json``
        or its UNet's ``addition_embed_type`` says so) also loads ``text_encoder_2`` and
        ``tokenizer_2``, and in float16 keeps its VAE in float32 where the VAE's config asks
        (``force_upcast``, as diffusers' SDXL pipeline: SDXL 1.0's VAE overflows in fp16)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        scheduler_cls = _scheduler_class(scheduler)
        source = str(model)
        local = Path(source).expanduser()
        if local.is_file():  # a single .safetensors/.ckpt checkpoint (grounded_sd.single_file)
            if local.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(f"{local.name} is neither a diffusers directory nor a .safetensors/.ckpt checkpoint")
            unet, vae, text_encoder, tokenizer, loaded_scheduler, xl_parts = load_single_file(
                local, torch_dtype=torch_dtype, config=single_file_config
            )
            if xl_parts:  # SDXL: its second encoder and tokenizer, and the VAE kept as the directory path keeps it
                xl_parts["text_encoder_2"] = xl_parts["text_encoder_2"].to(torch_device)
                vae = _sdxl_vae(vae, torch_dtype)
            try:
                noise_scheduler = scheduler_cls.from_config(loaded_scheduler.config)
                check_one_call_per_step(noise_scheduler)
            except ValueError as exc:
                raise ModelLoadError(f"cannot make scheduler {scheduler}: {exc}".splitlines()[0]) from exc
            return cls._assemble(model, torch_device, unet, vae, text_encoder, tokenizer, noise_scheduler,
                                 sam_checkpoint, sam_model_type, **xl_parts)
        if local.exists():
            xl = sdxl.declares_sdxl(local)
            parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (sdxl.PARTS if xl else ())
            missing = [part for part in parts if not (local / part).is_dir()]
            if missing:
                listed = ", ".join(f"{part}/" for part in missing)
                kind = "SDXL" if xl else "Stable Diffusion"
                raise ModelLoadError(f"{local} is not a diffusers {kind} directory: missing {listed}")
            source = str(local)
        extra: dict[str, Any] = {}
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch_dtype)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            if sdxl.is_sdxl_unet(unet.config):
                encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=torch_dtype)
                extra = {"text_encoder_2": encoder_2.to(torch_device), "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")}
                vae = _sdxl_vae(vae, torch_dtype)
            noise_scheduler = scheduler_cls.from_pretrained(source, subfolder="scheduler")
            check_one_call_per_step(noise_scheduler)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the diffusion model {source!r}: {exc}".splitlines()[0]) from exc
        return cls._assemble(model, torch_device, unet, vae, text_encoder, tokenizer, noise_scheduler, sam_checkpoint,
                             sam_model_type, **extra)

    @classmethod
    def _assemble(cls, model, torch_device, unet, vae, text_encoder, tokenizer, noise_scheduler, sam_checkpoint,
                  sam_model_type, **extra) -> "LMDPipeline":
        predictor = load_sam_predictor(sam_checkpoint, sam_model_type, str(torch_device)) if sam_checkpoint else None
        pipeline = cls(
            unet.to(torch_device), vae.to(torch_device), text_encoder.to(torch_device), tokenizer, noise_scheduler, predictor, **extra
        )
        pipeline.model_name = str(model)
        return pipeline

    # ------------------------------------------------------------------------------------------
    def __call__(
        self,
        layout: Layout | dict[str, Any],
        *,
        seed: int,
        options: LMDOptions | None = None,
        variant: Variant = "lmd",
        width: int | None = None,
        height: int | None = None,
        negative_prompt: str | None = None,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
        conditioning: Conditioning | None = None,
        source_prompt: str | None = None,
        language: str | None = None,
        preview: PreviewFn | None = None,
        per_box_images: bool = False,
        loras: Sequence[LoraChoice] = (),
    ) -> GenerationResult:
        """``conditioning`` (default: CLIP) decides what the denoising forwards see; guidance
        reads CLIP attention either way (docs/conditioning.md). ``source_prompt`` is the user's
        own prompt and ``language`` its ISO 639-1 code (detected when unset): GlueNet denoises
        the final pass with it. ``progress(stage, step, total)`` is called after every step;
        ``preview(stage, step, total, image)``, when given, every few steps with a cheap
        latent-to-RGB picture (``grounded_sd.previews``); nothing is computed for it otherwise.
        ``per_box_images``: also decode each object's per-box image into
        ``result.intermediates.per_box_images`` (otherwise only SAM's masks decode them).
        Under ``options.rescale_boxes`` the boxes are first stretched to span the canvas
        (layout_planner.rescale); ``result.layout`` is the layout as generated.
        ``loras``: the LoRA adapters of this call (:meth:`use_loras`); none: the plain model."""
        started = time.perf_counter()
        options = options or LMDOptions.reference()
        conditioning = conditioning or ClipConditioning()
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height

        # 1. Check inputs
        layout = self.check_inputs(layout, options=options, variant=variant, width=width, height=height)
        rescale = None
        if options.rescale_boxes and variant != "sd":  # the reference's stretch of the boxes over the canvas
            layout, rescale = rescale_boxes(layout)
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        check_one_call_per_step(self.scheduler, options.steps)
        try:
            layers = resolve_attention_layers(self.unet, options.attention_layers)
        except ValueError as exc:
            raise InvalidOptions(f"options.attention_layers: {exc}") from exc

        mode = options.conditioning_mode or conditioning.default_mode
        conditioning.check_mode(mode)
        conditioning_negative = options.conditioning_negative or conditioning.negatives[0]
        conditioning.check_negative(conditioning_negative)
        conditioning.check_unet(self.unet)
        if self.is_sdxl and conditioning.name != "clip":
            raise ConditioningUnavailable(
                f"conditioning {conditioning.name} is not wired for an SDXL base (its pooled embedding and tokens would "
                "disagree); use clip (docs/models.md)"
            )
        active_loras = self.use_loras(loras)  # before any encoding: text-encoder adapters change the prompts' embeddings

        # 2. Encode prompts (§2.3, §2.6): CLIP for guidance, the conditioning for denoising
        groups = group_phrases(layout)
        prompt = scene_prompt(layout.background, groups)
        negative = join_negative(layout.negative, negative_prompt, options.default_negative)
        prompts = box_prompts(layout) if variant != "sd" else ()
        clip = self._clip_embeddings([prompt], [negative], list(prompts), [box_negative(layout, options)])
        texts = TextInputs(prompt, prompts, negative, box_negative(layout, options), source_prompt=source_prompt, language=language)
        if conditioning_negative == "empty":  # ELLA's official pipeline: the conditioning encodes "" as the negative
            texts = dataclasses.replace(texts, negative_prompt="", box_negative_prompt="")
        conditioned = conditioning.prepare(texts, clip, mode=mode)
        report = GenerationReport(
            variant=variant, seed=seed, width=width, height=height, steps=options.steps, prompt=prompt,
            negative_prompt=negative, attention_layers=layers, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            model_type="sdxl" if self.is_sdxl else "sd", energy_threshold=self.energy_threshold(options, layers),
            time_ids=[height, width, 0, 0, height, width] if self.is_sdxl else None,
            model=self.model_name, scheduler=type(self.scheduler).__name__, loras=active_loras,
            options=options.model_dump(mode="json"), conditioning=conditioning.name, conditioning_mode=mode,
            conditioning_negative=conditioning_negative,
            source_prompt=source_prompt, language=conditioned.language,
            objects=[ObjectReport(id=o.id, phrase=o.phrase, box=o.box) for o in layout.objects], box_rescale=rescale,
        )
        if conditioning.name != "clip":
            report.notes.append(f"conditioned on {conditioning.name}, {mode} mode: {MODE_MEANINGS[mode]}")
        report.notes += conditioned.notes
        if conditioning_negative == "empty" and "layout" in conditioning.negatives:
            report.notes.append(
                f"{conditioning.name} encoded the empty string as the negative (ELLA's official pipeline); "
                f"the negative prompt {negative!r} reached CLIP only"
            )
        if variant != "sd" and not layout.objects:
            report.notes.append(f"the layout has no objects: rendered the background as plain SD instead of {variant}")

        # 3. Prepare noise: background from the job seed, each object's from (seed, id) (§2.7)
        channels = self.unet.config.in_channels
        background = seeded_noise((1, channels, *latent_hw), seed, self.device, self.dtype)

        with recording_attention(self.unet, layers, checkpointing=options.guidance_checkpointing) as recorder, torch.no_grad():
            run = Run(
                options=options, latent_hw=latent_hw, layers=layers, recorder=recorder, counter=UNetCounter(self.unet),
                progress=progress or (lambda stage, step, total: None), should_cancel=should_cancel or (lambda: False),
                seed=seed, init_sigma=float(self._scheduler(options.steps).init_noise_sigma),
                preview=preview, boxes=[o.box for o in layout.objects],
                time_ids=sdxl.time_ids(height, width, self.device, self.dtype) if self.is_sdxl else None,
            )
            intermediates = Intermediates(object_ids=[o.id for o in layout.objects])
            if variant == "sd" or not layout.objects:
                final_latents, masks = self._plain_sd(run, background, TextEmbeddings(conditioned, "final"), intermediates), {}
            else:
                final_latents, masks = self._grounded(
                    run, layout, background, conditioned, plus=variant == "lmd_plus", report=report, intermediates=intermediates,
                    keep_images=per_box_images,
                )

            # 8. Decode, overlay, report
            image = self._decode(final_latents, options.max_batch)[0]
        report.notes += run.notes
        report.stages = run.stages
        report.unet_total = run.counter.total()
        report.wall_s = time.perf_counter() - started
        overlay = draw_layout(layout, image)
        return GenerationResult(image=image, overlay=overlay, masks=masks, layout=layout, report=report, intermediates=intermediates)

    def _plain_sd(self, run: Run, background: torch.Tensor, text: TextEmbeddings, intermediates: Intermediates) -> torch.Tensor:
        """The baseline (§2.8): plain SD with the layout's prompt and negative prompt."""
        with self._stage(run, "sd", run.options.steps):
            out = denoise(run, self._scheduler(run.options.steps), "sd", background * run.init_sigma, text, run.options.steps, noise_keys=[""])
        intermediates.final_latents = torch.stack(out.trajectory).float().cpu()
        return out.trajectory[-1]

    def _grounded(
        self, run: Run, layout: Layout, background: torch.Tensor, conditioned: Conditioned, *, plus: bool,
        report: GenerationReport, intermediates: Intermediates, keep_images: bool,
    ) -> tuple[torch.Tensor, dict[str, Image.Image]]:
        """Steps 4-7 of ``__call__`` for ``lmd`` and ``lmd_plus``."""
        # 4. Per-box pass: all objects x CFG in one batch per step (§2.3)
        per_box = run_per_box_pass(
            self, run, layout, background, TextEmbeddings(conditioned, "per_box"), plus=plus, report=report, intermediates=intermediates
        )

        # 5. Masks: aggregated attention refined by SAM, with fallbacks (§2.4)
        with self._stage(run, "masks", len(layout.objects)):
            masks, latent_masks, shifts = segment_objects(
                self, run, layout, per_box, plus=plus, report=report, intermediates=intermediates, keep_images=keep_images
            )
        if per_box.centred:  # move each centred object's latents and maps to its layout box (§2.5)
            per_box = align_to_layout(per_box, shifts)

        # 6. Composition: largest mask first, so small objects end on top (§2.5)
        frozen_steps = run.options.frozen_steps(plus)
        composed, owner = compose_latents(
            per_box.latents[: frozen_steps + 1], latent_masks, background * run.init_sigma, step0=run.options.compose_step0
        )
        if run.preview is not None:
            shown = per_box.last_pred_x0 if per_box.last_pred_x0 is not None else per_box.latents[-1]
            run.preview("compose", 1, 1, composed_preview(shown, owner))
        intermediates.composed, intermediates.owner = composed.float().cpu(), owner.cpu()

        # 7. Final pass: frozen foreground, guidance on all objects, attention transfer (§2.6)
        frozen = FrozenForeground(composed, owner > 0, frozen_steps)
        final_latents, final_trace = run_final_pass(
            self, run, layout, TextEmbeddings(conditioned, "final"), frozen, per_box, plus=plus, report=report, intermediates=intermediates
        )
        for name, trace in (("per-box", per_box.trace), ("final", final_trace)):
            if trace.nonfinite_rows:
                run.notes.append(
                    f"{name} pass: {trace.nonfinite_rows} guidance update(s) skipped because the gradient was not finite "
                    "(low-precision overflow); try dtype float32 or bfloat16"
                )
        return final_latents, masks

    @property
    def native_size(self) -> int:
        """The image size the model was trained at, as diffusers' pipelines default to it
        (UNet sample size x VAE factor): 512 for SD 1.5, 1024 for SDXL, 64 for the shapes model."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------------------------------
    def check_inputs(self, layout: Layout | dict[str, Any], *, options: LMDOptions, variant: str, width: int, height: int) -> Layout:
        """A valid :class:`Layout`, or the :class:`InvalidRequest` kind that names the problem."""
        if variant not in VARIANTS:
            raise UnknownVariant(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if variant == "lmd_plus" and not self.supports_gligen:
            raise VariantUnavailable("variant lmd_plus needs a GLIGEN UNet (attention_type 'gated'); the loaded model has none")
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % 8 or value % self.vae_scale_factor:
                raise InvalidSize(f"{name} must be a positive multiple of {max(8, self.vae_scale_factor)}, got {value!r}")
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

    per_box_steps = staticmethod(per_box_steps)

    # --- small parts -----------------------------------------------------------------------------
    def _scheduler(self, steps: int):
        """A fresh copy of the loaded scheduler with its timesteps set: some values (Euler's
        ``init_noise_sigma`` with "leading" spacing) are only right once the timesteps are known."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """The token embeddings the UNet attends to (SDXL: both encoders' concatenated)."""
        return self._encode_texts(texts)[0]

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token embeddings, SDXL's pooled embeddings or None) of ``texts``; zero rows for none."""
        if not texts:
            return tuple(part[:0] if part is not None else None for part in self._encode_texts([""]))  # type: ignore[return-value]
        if self.is_sdxl:
            return sdxl.encode(texts, [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2], self.device, self.dtype)
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype), None

    def _clip_embeddings(self, *text_sets: list[str]) -> ClipEmbeddings:
        """The scene, negative, per-box and per-box negative texts encoded (with SDXL's pooled embeddings)."""
        encoded = [self._encode_texts(texts) for texts in text_sets]
        pooled = ClipEmbeddings(*(part[1] for part in encoded)) if self.is_sdxl else None
        return ClipEmbeddings(*(part[0] for part in encoded), pooled=pooled)

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
    def _stage(self, run: Run, name: str, steps: int) -> Iterator[None]:
        """Count UNet calls under ``name`` and record the stage's wall time."""
        run.counter.stage = name
        started = time.perf_counter()
        yield
        calls = run.counter.by_stage.get(name, UNetCalls())
        run.stages.append(StageReport(name=name, wall_s=time.perf_counter() - started, steps=steps, unet=calls))
