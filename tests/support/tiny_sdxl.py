"""An SDXL-shaped tiny UNet (pooled text embedding + added time ids) with a tiny VAE and a
scheduler, saved like a real model (only what connector training reads: unet/, vae/, scheduler/)."""

from __future__ import annotations

from pathlib import Path

import torch

POOLED_DIM = 16


def build_tiny_sdxl(path: Path | str, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48, attention_head_dim=4, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1
    )
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    return path
