"""Validation images during training: fixed prompts and seeds, plain classifier-free guided
DDIM sampling conditioned by the connector (recomputed at every timestep, as in generation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from grounded_sd.conditioning.llm import EncodedText
from grounded_sd.conditioning.trained import run_connector


@torch.no_grad()
def render(
    unet, vae, scheduler, module, cond: list[EncodedText], uncond: list[EncodedText], *,
    seed: int, steps: int, guidance_scale: float, resolution: int, sdxl: bool,
) -> Image.Image:
    device, dtype = unet.device, unet.dtype
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, unet.config.in_channels, resolution // vae_scale, resolution // vae_scale)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, device=device, dtype=dtype)
    for t in scheduler.timesteps:
        c, u = run_connector(module, cond, t), run_connector(module, uncond, t)
        states = torch.cat([u.hidden_states, c.hidden_states]).to(dtype)
        extra = {"added_cond_kwargs": {"text_embeds": torch.cat([u.pooled, c.pooled]).to(dtype), "time_ids": time_ids}} if sdxl else {}
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        noise_u, noise_c = unet(model_input, t, encoder_hidden_states=states, **extra).sample.chunk(2)
        latents = scheduler.step(noise_u + guidance_scale * (noise_c - noise_u), t, latents).prev_sample
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    pixels = vae.decode(scaled).sample[0].float().clamp(-1, 1)
    array = ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def write_validation(
    directory: Path, prompts: list[str], seeds: list[int], make_image: Callable[[int, int], Image.Image]
) -> list[Path]:
    """``make_image(prompt_index, seed)`` for every prompt and seed, saved as
    ``p{prompt:02d}_s{seed}.png`` with a ``prompts.txt`` listing the prompts."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prompts.txt").write_text("\n".join(f"p{i:02d}: {p}" for i, p in enumerate(prompts)) + "\n", encoding="utf-8")
    written = []
    for index in range(len(prompts)):
        for seed in seeds:
            path = directory / f"p{index:02d}_s{seed}.png"
            make_image(index, seed).save(path)
            written.append(path)
    return written
