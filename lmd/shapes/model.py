"""The shapes model's architecture: Stable Diffusion 1.x's topology at the shapes world's size.

The same diffusers classes as SD 1.5 (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel with CLIP's own tokenizer, DDIM), so every part of the project loads it with
``LMD_SD_MODEL=models/shapes``. Sizes (our choice, for two CPU cores, docs/shapes.md):

- the autoencoder downsamples 64 px images by 4 to 16x16x4 latents (flat shapes lose nothing);
- the UNet has two levels (16x16 and 8x8) with cross-attention at both and in the mid block, so
  the default guided layers (mid block + first up block) see 8x8 maps: one cell is 1/8 of the
  image, as SD 1.5's mid block at 512 px; 8 heads as SD 1.5, so the energy threshold keeps its scale;
- the text encoder is a 4-layer, 64-wide CLIP transformer over CLIP's full 49,408-token vocabulary.
"""

from __future__ import annotations

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_HIDDEN = 64


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64, 64), sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def build_text_encoder(vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )
    )


def build_scheduler():
    """SD 1.5's DDIM configuration."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
