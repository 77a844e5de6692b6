"""Random-weight Stable Diffusion models, written like real ones (diffusers layout on disk).

No weights can be downloaded on a test or benchmark machine, so the tests and ``lmd bench``
build models from configs and load them through the real ``LMDPipeline.from_pretrained``:

- ``tiny``: the smallest UNet that still has cross-attention at two resolutions (tests).
- ``tiny_sd2``: ``tiny`` with SD 2.x's topology where it differs from SD 1.x: a head count per
  block (``attention_head_dim`` a tuple, as SD 2's config spells it: 2 heads at the first level,
  4 at the second), linear projections in the transformers (``use_linear_projection``), an
  OpenCLIP-like text encoder (CLIP with ``gelu``) and a v-prediction scheduler.
- ``sd``: SD 1.x's *shape* (four UNet levels, two layers per level, cross-attention on the
  first three, the mid block and the first up block with attention at 1/32 and 1/16 of the
  image, a VAE that downsamples by 8) at a fraction of its width: the benchmark's default,
  so that the relative cost of LMD's stages resembles the real model's. Its images are noise.
- ``sd15``: SD 1.5's exact architecture (859.5M UNet, 123.1M CLIP ViT-L/14 text encoder,
  83.7M VAE; a 1,068.6M UNet with GLIGEN's gated attention and position net) with CLIP's real
  tokenizer (grounded_sd.clip_vocab): the real model's time and memory, with noise for images.
- ``build_random_sdxl``: a tiny SDXL base (two text encoders, ``text_time`` UNet) for tests;
  ``SDXL_UNET_CONFIG`` is SDXL 1.0's UNet for the memory benchmark (benchmarks/sdxl_memory.py).

The small shapes' tokenizer is written here: whole words from ``WORDS`` plus every byte-level
character, so any text tokenizes (into characters when the word is unknown).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from grounded_sd.clip_vocab import byte_symbols

WORDS = (
    "a an the one two three four and with of on in at near under above next to left right top bottom "
    "cat cats dog dogs red blue green yellow white black apple apples ball balls car tree lamp sofa "
    "table chair bird kitchen park street room realistic scene photo oil painting "
    "low quality blurry deformed disfigured bad anatomy watermark text duplicate many group "
    "occlusion occluded side border collate"
).split()

Shape = Literal["tiny", "tiny_sd2", "sd", "sd15"]
SHAPES: tuple[Shape, ...] = ("tiny", "tiny_sd2", "sd", "sd15")

ATTENTION_SHARPNESS = 4.0
"""Random init gives near-uniform cross-attention (every token ~1/77); the query and key
weights of every cross-attention are scaled by this so that attention maps, and the energy's
gradient, look more like a trained model's."""


def sharpen_cross_attention(unet) -> None:
    """Scale every cross-attention's query and key weights by :data:`ATTENTION_SHARPNESS`."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(ATTENTION_SHARPNESS)
                module.to_k.weight.mul_(ATTENTION_SHARPNESS)


def tiny_vocab_and_merges(words: list[str] | tuple[str, ...] = tuple(WORDS)) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary and merges that know ``words`` whole and everything else by character."""
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
            current += piece
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(directory: Path | str, words: list[str] | tuple[str, ...] = tuple(WORDS)):
    """Write vocab.json, merges.txt and a config to ``directory``; return the loaded CLIPTokenizer."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges(words)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True})
    )
    return CLIPTokenizer.from_pretrained(directory)


def unet_and_vae(shape: Shape, gligen: bool):
    """A random UNet and VAE of ``shape``, and the UNet's cross-attention width."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    attention_type = "gated" if gligen else "default"
    if shape == "tiny":
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32, attention_type=attention_type,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
        return unet, vae, 32
    if shape == "tiny_sd2":  # SD 2.x's differences at tiny size: heads per block, linear projections
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
            attention_type=attention_type,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
        return unet, vae, 32
    if shape == "sd15":  # SD 1.5's unet/config.json and vae/config.json, field by field
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", attention_type=attention_type,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            norm_num_groups=32, sample_size=512, act_fn="silu",
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        return unet, vae, 768
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32, attention_type=attention_type,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        norm_num_groups=32, sample_size=256,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    return unet, vae, 64


def text_encoder_config(shape: Shape, vocab: dict[str, int], hidden: int):
    """The CLIP text encoder's config of ``shape`` (``hidden``: the UNet's cross-attention width)."""
    from transformers import CLIPTextConfig

    ids = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
    if shape == "sd15":  # CLIP ViT-L/14's text tower (SD 1.5's text_encoder/config.json)
        return CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", **ids,
        )
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden + 5,
        num_hidden_layers=4 if shape == "sd" else 2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=hidden, hidden_act="gelu" if shape == "tiny_sd2" else "quick_gelu", **ids,
    )


def build_random_sd(
    path: Path | str, *, shape: Shape = "tiny", gligen: bool = False, seed: int = 0, clip_vocab: Path | str | None = None
) -> Path:
    """Write a random-weight SD 1.x-style model of ``shape`` to ``path`` (a GLIGEN UNet when ``gligen``).
    ``clip_vocab`` (``sd15`` only): CLIP's BPE file or the open-clip-torch wheel holding it; None: the
    installed open_clip package's (:mod:`grounded_sd.clip_vocab`)."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet, vae, hidden = unet_and_vae(shape, gligen)
    sharpen_cross_attention(unet)
    if shape == "sd15":
        from transformers import CLIPTokenizer

        from grounded_sd.clip_vocab import write_clip_tokenizer_files

        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(path / "tokenizer", clip_vocab))
    else:
        tokenizer = write_clip_tokenizer(path / "tokenizer")
    text_encoder = CLIPTextModel(text_encoder_config(shape, tokenizer.get_vocab(), hidden))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if shape == "tiny_sd2" else "epsilon",  # SD 2.x's 768 px models predict v
    )
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    components = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    pipeline_class = "StableDiffusionGLIGENPipeline" if gligen else "StableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class, **components}, indent=2))
    return path


SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
}
"""SDXL 1.0 base's ``unet/config.json``, the fields that differ from diffusers' defaults (2,567M
parameters; diffusers names the heads per level ``attention_head_dim``: 5, 10, 20 heads of 64)."""


def build_random_sdxl(path: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny random-weight SDXL *base* to ``path``, saved by ``StableDiffusionXLPipeline`` (its
    ``model_index.json``): two text encoders (``CLIPTextModel`` 32 wide, ``CLIPTextModelWithProjection``
    48 wide with a 40-d projection, so a swapped or dropped encoder fails loudly), their tokenizers
    (the second pads with ``!`` as SDXL 1.0's does), and a UNet with ``text_time`` added conditions
    (80-d context = 32 + 48; 40 pooled + 6 time ids x 8) whose lowest level has 2 transformer layers
    of 4 heads, so the default guided layers are 6 cross-attentions of 4 heads. Its images are noise."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    widths, pooled, time_dim = (32, 48), 40, 8
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=sum(widths), norm_num_groups=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
    )
    sharpen_cross_attention(unet)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    tokenizer = write_clip_tokenizer(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer_2")
    tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2", pad_token="!")
    config = text_encoder_config("tiny", tokenizer.get_vocab(), widths[0])
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(
        config.__class__(**{**config.to_dict(), "hidden_size": widths[1], "intermediate_size": 2 * widths[1] + 5, "projection_dim": pooled})
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler,
    ).save_pretrained(path)
    return path


def build_random_sdxl_refiner(path: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny random-weight model shaped like the SDXL refiner to ``path``: what
    ``StableDiffusionXLImg2ImgPipeline.from_pretrained`` loads (only the second text encoder,
    ``CLIPTextModelWithProjection``; a UNet with ``text_time`` added conditions that include the
    aesthetic score, ``requires_aesthetics_score=True``). Its images are noise."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    hidden, time_dim = 32, 8
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=4, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=hidden + 5 * time_dim,  # pooled text + (size, crop, aesthetic score)
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    tokenizer = write_clip_tokenizer(path / "tokenizer_2")
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden + 5, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder, tokenizer=None, tokenizer_2=tokenizer, unet=unet,
        scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(path)
    return path
