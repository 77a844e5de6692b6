"""The training loop of ``lmd train-connector``, on ``accelerate``.

Frozen UNet, VAE and language models; only the connector learns. Each micro-step: encode the
images to latents, draw timesteps uniformly and noise, condition the UNet with the connector
(captions dropped to "" at ``caption_dropout`` for classifier-free guidance) and regress the
scheduler's target (the noise for epsilon models, the velocity for v-prediction models).

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
from lmd.training.data import CaptionedImages, FeatureCache, StreamSampler

CHECKPOINTS = "checkpoints"
EXPORT = "connector"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    step: int
    export: Path
    losses: list[float]


def connector_spec(setup: Setup) -> ConnectorSpec:
    c = setup.config.connector
    return ConnectorSpec(
        kind=c.kind, encoders=c.encoders, in_dims=setup.in_dims, cross_attention_dim=setup.base.cross_attention_dim,
        pooled_dim=setup.base.pooled_dim, refiner=c.refiner, ella=c.ella, guidance=c.resolved_guidance, base_model=setup.config.base_model,
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
    accelerator = Accelerator(mixed_precision=train_cfg.mixed_precision, cpu=not _has_accelerator())
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
        captions = sorted({ex.caption for ex in setup.examples})[rank::world]
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

    # The connector, its optimizer, schedule and EMA
    torch.manual_seed(train_cfg.seed)
    module = build_module(spec)
    if train_cfg.gradient_checkpointing:
        module.set_gradient_checkpointing(True)
    module.to(device).train()
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.optimizer.lr, betas=config.optimizer.betas, eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay
    )
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
    dataset = CaptionedImages(setup.examples, resolution, cache)
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

    def micro_step(batch: dict, micro: int) -> torch.Tensor:
        generator = micro_step_generator(train_cfg.seed, micro, rank)
        rows = batch["pixels"].shape[0]
        keep = torch.rand(rows, generator=generator) >= config.data.caption_dropout
        t = torch.randint(0, timesteps_total, (rows,), generator=generator)
        pixels = batch["pixels"].to(device, weight_dtype)
        with torch.no_grad():
            moments = vae.encode(pixels).latent_dist
            eps = torch.randn(moments.mean.shape, generator=generator).to(device, moments.mean.dtype)
            latents = ((moments.mean + moments.std * eps) - vae_shift) * vae_scale
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            t = t.to(device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
        encoded = encode_batch(batch, keep.to(device))
        with accelerator.autocast():
            out = run_connector(module, encoded, t)
        extra = {}
        if base.sdxl:
            time_ids = torch.cat([batch["original_size"], batch["crop"], torch.tensor([[resolution, resolution]] * rows)], dim=1)
            extra = {"added_cond_kwargs": {"text_embeds": out.pooled.to(weight_dtype), "time_ids": time_ids.to(device, weight_dtype)}}
        pred = unet(noisy, t, encoder_hidden_states=out.hidden_states.to(weight_dtype), **extra).sample
        return F.mse_loss(pred.float(), target.float())

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
    if main:
        log(
            f"training a {spec.kind} connector ({sum(p.numel() for p in unwrapped().parameters()) / 1e6:.2f} M parameters) "
            f"for {train_cfg.steps} steps: {world} process(es) x batch {batch_size} x accumulation {accum}, {len(dataset)} images at {resolution}px"
        )
    bar = tqdm(total=train_cfg.steps, initial=step, desc="train-connector", unit="step", disable=not (main and progress), dynamic_ncols=True)
    losses: list[float] = []
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
        if log_file and step % train_cfg.log_every == 0:
            log_file.write(json.dumps({"step": step, "loss": window, "lr": schedule.lr(), "images_per_s": rate}) + "\n")
            log_file.flush()
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
        log(f"exported {export} (use: lmd generate --conditioning connector:{export})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(step, export, losses)


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()
