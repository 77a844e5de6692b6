"""A tiny Stable Diffusion with random weights, saved like a real one (diffusers layout).

``build_tiny_sd(path)`` writes unet/, vae/, text_encoder/, tokenizer/ and scheduler/ under
``path``; ``LMDPipeline.from_pretrained(path)`` then loads it through the real loading code.
The tokenizer's vocabulary and merges are written here: whole words the tests use plus every
byte-level character, so any text tokenizes. The VAE downsamples by 2: a 64x64 image is a
32x32 latent, and the UNet's cross-attentions see 16x16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORDS = (
    "a an the one two three four and with of on in at near under above next to left right "
    "cat cats dog dogs red blue green yellow white black apple apples ball balls car tree "
    "table chair bird kitchen park street room realistic scene photo oil painting "
    "low quality blurry deformed disfigured bad anatomy watermark text duplicate many group "
    "occlusion occluded side border collate"
).split()

ATTENTION_SHARPNESS = 4.0


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (GPT-2 style)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in WORDS:
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


def build_tiny_sd(path: Path | str, gligen: bool = False, seed: int = 0) -> Path:
    """Write a tiny random SD 1.x-style model to ``path`` (a GLIGEN UNet when ``gligen``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
        attention_type="gated" if gligen else "default",
    )
    # Random init gives near-uniform cross-attention (every token ~1/77): sharpen it so that
    # attention maps, and the energy's gradient, look more like a trained model's.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(ATTENTION_SHARPNESS)
                module.to_k.weight.mul_(ATTENTION_SHARPNESS)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
    )
    vocab, merges = tiny_vocab_and_merges()
    tokenizer_dir = path / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True})
    )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(tokenizer_dir)
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionGLIGENPipeline" if gligen else "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            },
            indent=2,
        )
    )
    return path


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_gligen_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_gligen_sd"), gligen=True)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_sd_path: Path):
    """The tiny model loaded once through ``LMDPipeline.from_pretrained`` (CPU, fp32)."""
    from grounded_sd import LMDPipeline

    torch.set_num_threads(1)
    return LMDPipeline.from_pretrained(tiny_sd_path, device="cpu")
