"""Train the shapes model from scratch on CPU: the autoencoder, then the UNet with the text encoder.

    python -m lmd.shapes.train --work runs/shapes-train --out models/shapes

Fixed seed, resumable (a checkpoint every ``--save-every`` steps in ``--work``; run the same
command again to continue), a JSONL log of the losses, and at the end a diffusers directory in
``--out`` with the EMA weights (docs/shapes.md). The scenes are drawn once from the seed; the
captions are drawn anew at every step from each scene's objects (lmd.shapes.world.caption).

The shipped model is this run followed by a fine-tuning run from its output with the token-level
attention loss of lmd.shapes.grounding (``--init DIR --grounding-weight W``; docs/shapes.md gives
both commands).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from grounded_sd.attention import cross_attention_names, recording_attention
from lmd.shapes import grounding, world
from lmd.shapes import model as shapes_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmd.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoints, latent cache and the loss log")
    parser.add_argument("--out", type=Path, required=True, help="the trained diffusers directory")
    parser.add_argument("--tokenizer", type=Path, help="a CLIPTokenizer folder (default: made from open-clip-torch's BPE file)")
    parser.add_argument("--scenes", type=int, default=30000)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path,
                        help="start from a trained diffusers directory (its autoencoder kept as is, its UNet and text "
                             "encoder trained further) instead of from scratch")
    parser.add_argument("--grounding-weight", type=float, default=0.0,
                        help="weight of the token-level attention loss (lmd.shapes.grounding); 0: plain denoising")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="stop the UNet's training at this step of the --unet-steps schedule and export (the shipped "
                             "model is step 900 of a 1,500-step schedule: docs/shapes.md)")
    parser.add_argument("--export-only", action="store_true",
                        help="write --out from the latest checkpoints (EMA weights) without training further")
    return parser.parse_args(argv)


def make_scenes(count: int, seed: int) -> tuple[list[world.Scene], np.ndarray]:
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(world.render(s)) for s in scenes])
    return scenes, pixels


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **row) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_vae(args, pixels: np.ndarray, log: Log):
    if args.init is not None:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(args.init, subfolder="vae").eval()
    vae = shapes_model.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    checkpoint = args.work / "vae.pt"
    step = 0
    generator = torch.Generator().manual_seed(args.seed + 1)
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step = state["step"]
    started = time.time()
    while step < args.vae_steps and not args.export_only:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, args.vae_steps, 1e-3)
        index = torch.randint(0, len(pixels), (args.vae_batch,), generator=generator)
        x = to_tensor(pixels[index.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean()
        loss = mse + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        log.write(phase="vae", step=step, loss=round(loss.item(), 6), mse=round(mse.item(), 6), kl=round(kl.item(), 2))
        if step % 20 == 0:
            print(f"vae {step}/{args.vae_steps} mse {mse.item():.5f} ({(time.time() - started) / 60:.1f} min)", flush=True)
        if step % args.save_every == 0 or step == args.vae_steps:
            _save(checkpoint, model=vae.state_dict(), optimizer=optimizer.state_dict(), generator=generator.get_state(), step=step)
    return vae.eval()


@torch.no_grad()
def encode_all(args, vae, pixels: np.ndarray) -> tuple[torch.Tensor, float]:
    """Latent means of every scene and the scaling factor that gives them unit variance (SD's 0.18215)."""
    cache = args.work / "latents.pt"
    if cache.exists():
        state = torch.load(cache)
        return state["latents"], state["scale"]
    chunks = [vae.encode(to_tensor(pixels[i : i + 256])).latent_dist.mean for i in range(0, len(pixels), 256)]
    latents = torch.cat(chunks)
    scale = float(vae.config.scaling_factor) if args.init is not None else float(1.0 / latents.std())
    torch.save({"latents": latents, "scale": scale}, cache)
    return latents, scale


def train_unet(args, scenes, latents: torch.Tensor, scale: float, tokenizer, log: Log):
    if args.init is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder")
    else:
        unet = shapes_model.build_unet()
        text_encoder = shapes_model.build_text_encoder(tokenizer.get_vocab())
    unet.train()
    text_encoder.train()
    scheduler = shapes_model.build_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    checkpoint = args.work / "unet.pt"
    step = 0
    generator = torch.Generator().manual_seed(args.seed + 2)
    captions_rng = random.Random(args.seed + 3)
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"]
        generator.set_state(state["generator"])
        captions_rng.setstate(state["captions_rng"])
        step = state["step"]
    alphas = scheduler.alphas_cumprod
    started, first = time.time(), step
    layers = cross_attention_names(unet) if args.grounding_weight > 0 else []
    with recording_attention(unet, layers) as recorder:
        last = min(args.unet_steps, args.stop_after or args.unet_steps)
        while step < last and not args.export_only:
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, args.unet_steps, args.lr)
            index = torch.randint(0, len(latents), (args.unet_batch,), generator=generator)
            texts = [world.caption(scenes[i], captions_rng) for i in index.tolist()]
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            z0 = latents[index] * scale
            noise = torch.randn(z0.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            recorder.clear()
            with recorder.capture(layers):
                prediction = unet(zt, t, text_encoder(ids)[0]).sample
                maps = recorder.maps()
            mse = F.mse_loss(prediction, noise)
            extra = {}
            if layers:
                targets = [grounding.token_targets(text, scenes[i], tokenizer) for text, i in zip(texts, index.tolist())]
                attention = grounding.attention_loss(maps, targets)
                loss = mse + args.grounding_weight * attention
                inside, outside = grounding.attention_inside(maps, targets)
                extra = {"mse": round(mse.item(), 6), "attention": round(attention.item(), 4),
                         "inside": round(inside, 4), "outside": round(outside, 4)}
            else:
                loss = mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for shadow, p in zip(ema, params):
                    shadow.lerp_(p.detach(), 1 - decay)
            log.write(phase="unet", step=step, loss=round(loss.item(), 6), **extra)
            if step % 20 == 0:
                rate = (time.time() - started) / max(1, step - first)
                shown = " ".join(f"{k} {v}" for k, v in extra.items())
                print(f"unet {step}/{args.unet_steps} loss {loss.item():.4f} {shown} ({rate:.2f} s/step, {rate * (args.unet_steps - step) / 60:.0f} min left)", flush=True)
            if step % args.save_every == 0 or step == last:
                _save(
                    checkpoint, unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), optimizer=optimizer.state_dict(),
                    ema=ema, generator=generator.get_state(), captions_rng=captions_rng.getstate(), step=step,
                )
    with torch.no_grad():
        for shadow, p in zip(ema, params):
            p.copy_(shadow)
    return unet.eval(), text_encoder.eval(), scheduler


def export(args, vae, unet, text_encoder, tokenizer, scheduler, scale: float) -> None:
    """The diffusers directory (safetensors), as StableDiffusionPipeline.save_pretrained writes it."""
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    for config in args.out.glob("*/config.json"):  # a model loaded with --init names its local path: not shipped
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_tokenizer(args):
    from transformers import CLIPTokenizer

    from grounded_sd.clip_vocab import write_clip_tokenizer_files

    folder = args.tokenizer
    if folder is None:
        folder = write_clip_tokenizer_files(args.work / "tokenizer")
    return CLIPTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "log.jsonl")
    from grounded_sd.clip_vocab import ClipVocabularyMissing

    try:
        tokenizer = load_tokenizer(args)
    except (ClipVocabularyMissing, OSError) as exc:
        raise SystemExit(f"python -m lmd.shapes.train: error: no CLIP tokenizer: {exc}; give --tokenizer DIR") from None
    scenes, pixels = make_scenes(args.scenes, args.seed)
    print(f"{len(scenes)} scenes drawn", flush=True)
    vae = train_vae(args, pixels, log)
    latents, scale = encode_all(args, vae, pixels)
    print(f"latents {tuple(latents.shape)}, scaling factor {scale:.4f}", flush=True)
    unet, text_encoder, scheduler = train_unet(args, scenes, latents, scale, tokenizer, log)
    export(args, vae, unet, text_encoder, tokenizer, scheduler, scale)
    print(f"saved {args.out} (UNet step {_unet_step(args)})", flush=True)


def _unet_step(args) -> int:
    checkpoint = args.work / "unet.pt"
    return torch.load(checkpoint, weights_only=False)["step"] if checkpoint.exists() else 0


if __name__ == "__main__":
    main()
