"""The training loop of ``lmd train-connector``, on ``accelerate``.

Frozen UNet, VAE and language models; only the connector learns. Each micro-step: encode the
images to latents (or read them from the latent cache), draw timesteps uniformly and noise
(plus offset noise when asked), condition the UNet with the connector (captions dropped to ""
at ``caption_dropout`` for classifier-free guidance) and regress the scheduler's target (the
noise for epsilon models, the velocity for v-prediction models), each sample's error weighted
by min-SNR when asked. Held-out captions give a validation loss at fixed draws.

One process or many: ``accelerate launch`` starts the processes (data parallel over the
connector, which is all that has gradients); the same code runs on one CPU. Every random draw
of a micro-step comes from a generator seeded by (seed, micro-step, process), and the sample
order is a function of the position (:class:`~lmd.training.data.StreamSampler`), so a resumed
run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from grounded_sd.conditioning.llm import EncodedText, LLMTextEncoder
from grounded_sd.conditioning.trained import ConnectorSpec, build_module, run_connector, save_connector
from grounded_sd.errors import ConnectorError
from lmd.training.config import Setup, TrainConfig
from lmd.training.data import CaptionedImages, FeatureCache, LatentCache, StreamSampler, load_image

CHECKPOINTS = "checkpoints"
EXPORT = "connector"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    step: int
    export: Path
    losses: list[float]
    validation_losses: dict[int, float]


def build_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (checked installed by ``check_setup``)."""
    o = config.optimizer
    if o.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(parameters, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training
    via Min-SNR Weighting Strategy", arXiv 2303.09556): ``min(SNR, gamma) / SNR`` for a noise
    target and ``min(SNR, gamma) / (SNR + 1)`` for a velocity target, as diffusers'
    ``train_text_to_image.py`` computes them; the SNR is diffusers' ``compute_snr``."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


def tracker_hparams(config: TrainConfig) -> dict[str, float | int | str | bool]:
    """The config flattened to the scalar values TensorBoard's hparams (and W&B) take."""
    flat: dict[str, float | int | str | bool] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    walk("", config.model_dump(mode="json"))
    return flat


def connector_spec(setup: Setup) -> ConnectorSpec:
    c = setup.config.connector
    return ConnectorSpec(
        kind=c.kind, encoders=c.encoders, in_dims=setup.in_dims, cross_attention_dim=setup.base.cross_attention_dim,
        pooled_dim=setup.base.pooled_dim, refiner=c.refiner if c.kind == "lidit" else None, ella=c.ella if c.kind == "ella" else None,
        guidance=c.resolved_guidance, base_model=setup.config.base_model,
    ).check()


def micro_step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + micro_step) * 1009 + rank) % (2**63))


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ConnectorError(f"--resume {resume}: not a checkpoint directory ({STATE_FILE} missing)")
        return path
    found = sorted((output_dir / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    found = [p for p in found if (p / STATE_FILE).is_file()]
    if not found:
        raise ConnectorError(f"--resume latest: no checkpoint under {output_dir / CHECKPOINTS}")
    return found[-1]


class _Schedule:
    """Learning-rate schedule with a state dict (accelerate checkpoints it as a custom object)."""

    def __init__(self, optimizer, config: TrainConfig) -> None:
        from diffusers.optimization import get_scheduler

        name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[config.optimizer.schedule]
        self.inner = get_scheduler(name, optimizer, num_warmup_steps=config.optimizer.warmup_steps, num_training_steps=config.training.steps)

    def step(self) -> None:
        self.inner.step()

    def lr(self) -> float:
        return float(self.inner.get_last_lr()[0])

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def train(setup: Setup, *, resume: str | None = None, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from tqdm import tqdm

    config, base = setup.config, setup.base
    train_cfg = config.training
    out = config.output_dir
    # With no accelerator device, processes started by `accelerate launch --multi_gpu` (torchrun
    # underneath) join as CPU processes over gloo; accelerate's own --cpu launcher needs MPI.
    accelerator = Accelerator(
        mixed_precision=train_cfg.mixed_precision, cpu=not _has_accelerator(), log_with=setup.tracker, project_dir=str(out / "tracker"),
    )
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[train_cfg.mixed_precision]
    resolution = setup.resolution
    resume_from = find_checkpoint(out, resume) if resume else None
    spec = connector_spec(setup)
    if resume_from is not None:
        saved = ConnectorSpec.model_validate_json((resume_from / "connector.json").read_text(encoding="utf-8"))
        if saved.model_dump(exclude={"steps"}) != spec.model_dump(exclude={"steps"}):
            raise ConnectorError(f"{resume_from} was trained with a different connector or base model; resume with the same config")

    # Frozen parts
    if main:
        log(f"loading {base.source} ({'SDXL' if base.sdxl else 'SD'}; {base.prediction_type} prediction) on {device}")
    unet = UNet2DConditionModel.from_pretrained(base.source, subfolder="unet", torch_dtype=weight_dtype).to(device).requires_grad_(False).eval()
    vae = AutoencoderKL.from_pretrained(base.source, subfolder="vae", torch_dtype=weight_dtype).to(device).requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler.from_pretrained(base.source, subfolder="scheduler")
    if train_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    text_dtype = weight_dtype if device.type != "cpu" else torch.float32
    encoders = [LLMTextEncoder.load(e, device=device, dtype=text_dtype) for e in config.connector.encoders]
    n_instruction = [len(e.prefix_ids) for e in encoders]

    # What the language models are needed for: captions (or their cache), "", validation prompts
    empty = [e.encode([""]) for e in encoders]
    prompts = config.validation.prompts
    validation_text = [e.encode(prompts) for e in encoders] if main else None
    cache = None
    if config.data.cache_features:
        cache = FeatureCache(config.cache_dir, config.connector.encoders)
        captions = sorted({ex.caption for ex in setup.examples + setup.held_out})[rank::world]
        todo = [c for c in captions if not cache.has(c)]
        batch = max(1, train_cfg.batch_size)
        for start in tqdm(range(0, len(todo), batch), desc="caching features", disable=not (main and progress), unit="batch"):
            chunk = todo[start : start + batch]
            encoded = [e.encode(chunk) for e in encoders]
            for row, caption in enumerate(chunk):
                cache.save(caption, encoded, row)
        accelerator.wait_for_everyone()
        encoders = []  # the language models are not needed any more: free their memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    latent_cache = None
    if config.data.cache_latents:
        latent_cache = LatentCache(config.latent_cache_dir, base.source, resolution, weight_dtype)
        images = sorted({ex.image for ex in setup.examples + setup.held_out})[rank::world]
        todo = [image for image in images if not latent_cache.has(image)]
        batch = max(1, train_cfg.batch_size)
        for start in tqdm(range(0, len(todo), batch), desc="caching latents", disable=not (main and progress), unit="batch"):
            chunk = todo[start : start + batch]
            loaded = [load_image(image, resolution) for image in chunk]
            with torch.no_grad():
                posterior = vae.encode(torch.stack([p for p, _, _ in loaded]).to(device, weight_dtype)).latent_dist
            for row, (image, (_, original, crop)) in enumerate(zip(chunk, loaded)):
                latent_cache.save(image, posterior.mean[row], posterior.std[row], torch.tensor(original), torch.tensor(crop))
        accelerator.wait_for_everyone()

    # The connector, its optimizer, schedule and EMA
    torch.manual_seed(train_cfg.seed)
    module = build_module(spec)
    if train_cfg.gradient_checkpointing:
        module.set_gradient_checkpointing(True)
    module.to(device).train()
    optimizer = build_optimizer(module.parameters(), config)
    schedule = _Schedule(optimizer, config)
    ema = None
    if train_cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(module.parameters(), decay=train_cfg.ema_decay)
        ema.to(device)
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(schedule)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = int(json.loads((resume_from / STATE_FILE).read_text())["step"])
        if main:
            log(f"resumed from {resume_from} at step {step}")

    accum, batch_size = train_cfg.grad_accum, train_cfg.batch_size
    dataset = CaptionedImages(setup.examples, resolution, cache, latent_cache)
    held_out = CaptionedImages(setup.held_out, resolution, cache, latent_cache)
    sampler = StreamSampler(
        len(dataset), batch_size=batch_size, rank=rank, world=world, seed=train_cfg.seed,
        start_micro_step=step * accum, micro_steps=(train_cfg.steps - step) * accum,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=config.data.num_workers, drop_last=False,
        persistent_workers=config.data.num_workers > 0,
    )
    empty_features = [EncodedText(p.features.to(device), p.mask.to(device), n, p.offsets) for p, n in zip(empty, n_instruction)]
    vae_scale = vae.config.scaling_factor
    vae_shift = getattr(vae.config, "shift_factor", None) or 0.0
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ConnectorError(f"the base model's scheduler predicts {prediction!r}; training supports epsilon and v_prediction")
    timesteps_total = noise_scheduler.config.num_train_timesteps

    def encode_batch(batch: dict, keep: torch.Tensor) -> list[EncodedText]:
        if cache is not None:
            parts = []
            for i, n in enumerate(n_instruction):
                features = batch[f"features_{i}"].to(device)
                mask = batch[f"mask_{i}"].to(device)
                features = torch.where(keep[:, None, None], features, empty_features[i].features.to(features.dtype))
                mask = torch.where(keep[:, None], mask, empty_features[i].mask)
                parts.append(EncodedText(features, mask, n, []))
            return parts
        captions = [c if k else "" for c, k in zip(batch["caption"], keep.tolist())]
        return [e.encode(captions) for e in encoders]

    @torch.no_grad()
    def posterior(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std of the batch's images (cached or encoded now)."""
        if "latent_mean" in batch:
            return batch["latent_mean"].to(device, weight_dtype), batch["latent_std"].to(device, weight_dtype)
        moments = vae.encode(batch["pixels"].to(device, weight_dtype)).latent_dist
        return moments.mean, moments.std

    def denoising_errors(model, batch: dict, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, encoded) -> torch.Tensor:
        """Each sample's mean squared error of the UNet conditioned by ``model``."""
        rows = latents.shape[0]
        with torch.no_grad():
            noisy = noise_scheduler.add_noise(latents, noise, t)
            target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
        with accelerator.autocast():
            out = run_connector(model, encoded, t)
        extra = {}
        if base.sdxl:
            time_ids = torch.cat([batch["original_size"], batch["crop"], torch.tensor([[resolution, resolution]] * rows)], dim=1)
            extra = {"added_cond_kwargs": {"text_embeds": out.pooled.to(weight_dtype), "time_ids": time_ids.to(device, weight_dtype)}}
        pred = unet(noisy, t, encoder_hidden_states=out.hidden_states.to(weight_dtype), **extra).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def micro_step(batch: dict, micro: int) -> torch.Tensor:
        generator = micro_step_generator(train_cfg.seed, micro, rank)
        rows = len(batch["caption"])
        keep = torch.rand(rows, generator=generator) >= config.data.caption_dropout
        t = torch.randint(0, timesteps_total, (rows,), generator=generator)
        with torch.no_grad():
            mean, std = posterior(batch)
            eps = torch.randn(mean.shape, generator=generator).to(device, mean.dtype)
            drawn = mean + std * eps if train_cfg.latents == "sample" else mean  # eps drawn either way: the same later draws
            latents = (drawn - vae_shift) * vae_scale
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            if train_cfg.noise_offset:  # offset noise: a per-image, per-channel shift the UNet must also predict
                offset = torch.randn((rows, latents.shape[1], 1, 1), generator=generator).to(device, latents.dtype)
                noise = noise + train_cfg.noise_offset * offset
            t = t.to(device)
        errors = denoising_errors(module, batch, latents, noise, t, encode_batch(batch, keep.to(device)))
        if train_cfg.snr_gamma is not None:
            errors = errors * min_snr_weights(noise_scheduler, t, train_cfg.snr_gamma, prediction)
        return errors.mean()

    @torch.no_grad()
    def validation_loss() -> float:
        """Mean squared error (unweighted, no offset noise, no caption dropout) over the held-out
        images at ``validation.loss_timesteps`` evenly spread timesteps, each image with the same
        noise at every evaluation: the curve compares the connector with itself, not the draws."""
        from torch.utils.data import default_collate

        model = unwrapped()
        model.eval()
        k = config.validation.loss_timesteps
        timesteps = ((torch.arange(k) + 0.5) * timesteps_total / k).long().to(device)
        total, images_per_batch = 0.0, max(1, train_cfg.batch_size)
        for start in range(0, len(held_out), images_per_batch):
            indices = range(start, min(start + images_per_batch, len(held_out)))
            images = default_collate([held_out[i] for i in indices])
            mean, _ = posterior(images)
            # each image k times, once per timestep; its noise from its own index's generator
            batch = {key: value.repeat_interleave(k, dim=0) if isinstance(value, torch.Tensor) else [v for v in value for _ in range(k)]
                     for key, value in images.items()}
            latents = ((mean - vae_shift) * vae_scale).repeat_interleave(k, dim=0)
            noise = torch.cat([
                torch.randn((k, *latents.shape[1:]), generator=torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + i)) for i in indices
            ]).to(device, latents.dtype)
            encoded = encode_batch(batch, torch.ones(len(latents), dtype=torch.bool, device=device))
            total += float(denoising_errors(model, batch, latents, noise, timesteps.repeat(len(indices)), encoded).sum())
        model.train()
        return total / max(1, len(held_out) * k)

    def unwrapped():
        return accelerator.unwrap_model(module)

    def save_checkpoint(at: int) -> Path:
        path = out / CHECKPOINTS / f"step-{at:06d}"
        accelerator.save_state(str(path))
        if main:
            (path / STATE_FILE).write_text(json.dumps({"step": at, "config": config.model_dump(mode="json")}, indent=2))
            (path / "connector.json").write_text(spec.model_dump_json(indent=2))
            existing = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in existing[: -train_cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    def with_export_weights(fn):
        """Run ``fn`` with the EMA weights in place when EMA is on."""
        params = list(unwrapped().parameters())
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            return fn()
        finally:
            if ema is not None:
                ema.restore(params)

    def validate(at: int) -> None:
        if not main:
            return
        from lmd.training.validation import render, write_validation

        scheduler = DDIMScheduler.from_pretrained(base.source, subfolder="scheduler")
        target = unwrapped()
        target.eval()

        def image(index: int, seed: int):
            cond = [p.select([index]).to(device) for p in validation_text]
            return render(
                unet, vae, scheduler, target, cond, empty_features, seed=seed, steps=config.validation.steps,
                guidance_scale=config.validation.guidance_scale, resolution=resolution, sdxl=base.sdxl,
            )

        with_export_weights(lambda: write_validation(out / "validation" / f"step-{at:06d}", prompts, config.validation.seeds, image))
        target.train()

    # The loop
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.jsonl").open("a", encoding="utf-8") if main else None
    accelerator.init_trackers("train-connector", config=tracker_hparams(config))
    if main:
        held = f", {len(held_out)} held out" if len(held_out) else ""
        log(
            f"training a {spec.kind} connector ({sum(p.numel() for p in unwrapped().parameters()) / 1e6:.2f} M parameters) "
            f"for {train_cfg.steps} steps: {world} process(es) x batch {batch_size} x accumulation {accum}, "
            f"{len(dataset)} images at {resolution}px{held}; {config.optimizer.name}, tracker {setup.tracker or 'none (log.jsonl)'}"
        )
    bar = tqdm(total=train_cfg.steps, initial=step, desc="train-connector", unit="step", disable=not (main and progress), dynamic_ncols=True)
    losses: list[float] = []
    validation_losses: dict[int, float] = {}
    run_started = time.perf_counter()
    if main and len(held_out) and step == 0:  # where the curve starts: the untrained connector
        validation_losses[0] = with_export_weights(validation_loss)
        log_file.write(json.dumps({"step": 0, "validation_loss": validation_losses[0]}) + "\n")
        accelerator.log({"validation/loss": validation_losses[0]}, step=0)
    window = 0.0
    started = time.perf_counter()
    micro = step * accum
    for batch in loader:
        last_of_step = (micro + 1) % accum == 0
        context = accelerator.no_sync(module) if not last_of_step else contextlib.nullcontext()
        with context:
            loss = micro_step(batch, micro)
            accelerator.backward(loss / accum)
        window += float(accelerator.gather(loss.detach()[None]).mean()) / accum
        micro += 1
        if not last_of_step:
            continue
        if config.optimizer.max_grad_norm is not None:
            accelerator.clip_grad_norm_(module.parameters(), config.optimizer.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unwrapped().parameters())
        step += 1
        losses.append(window)
        elapsed = time.perf_counter() - started
        rate = batch_size * accum * world / max(elapsed, 1e-9)
        row = {"step": step, "loss": window, "lr": schedule.lr(), "images_per_s": rate}
        if main and len(held_out) and (step % config.validation.every == 0 or step == train_cfg.steps):
            row["validation_loss"] = validation_losses[step] = with_export_weights(validation_loss)
        if log_file and (step % train_cfg.log_every == 0 or "validation_loss" in row):
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            accelerator.log({f"{'validation' if key == 'validation_loss' else 'train'}/{key.removeprefix('validation_')}": value
                             for key, value in row.items() if key != "step"}, step=step)
        bar.set_postfix(loss=f"{window:.4f}", lr=f"{schedule.lr():.2e}", img_s=f"{rate:.1f}")
        bar.update(1)
        window = 0.0
        started = time.perf_counter()
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
            save_checkpoint(step)
        if step % config.validation.every == 0 or step == train_cfg.steps:
            validate(step)
    bar.close()
    if log_file:
        log_file.close()

    export = out / EXPORT
    if main:
        final = spec.model_copy(update={"steps": step})
        with_export_weights(lambda: save_connector(export, final, unwrapped()))
        summary = {
            "kind": spec.kind, "steps": step, "steps_this_run": len(losses), "processes": world, "device": str(device),
            "images_per_step": batch_size * accum * world, "parameters": sum(p.numel() for p in unwrapped().parameters()),
            "train_wall_s": round(time.perf_counter() - run_started, 3), "mixed_precision": train_cfg.mixed_precision,
            "last_loss": losses[-1] if losses else None, "validation_losses": {str(k): v for k, v in validation_losses.items()},
            "held_out_images": len(held_out), "training_images": len(dataset),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        log(f"exported {export} (use: lmd generate --conditioning connector:{export})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(step, export, losses, validation_losses)


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()
