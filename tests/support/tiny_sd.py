"""A tiny Stable Diffusion with random weights, saved like a real one (diffusers layout).

``build_tiny_sd(path)`` writes unet/, vae/, text_encoder/, tokenizer/ and scheduler/ under
``path`` (``grounded_sd.random_model``, shape ``tiny``); ``LMDPipeline.from_pretrained(path)``
then loads it through the real loading code. The VAE downsamples by 2: a 64x64 image is a
32x32 latent, and the UNet's cross-attentions see 16x16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grounded_sd.random_model import (  # noqa: F401  (re-exported)
    WORDS, build_random_sd, build_random_sdxl, build_random_sdxl_refiner, tiny_vocab_and_merges,
)


def build_tiny_sd(path: Path | str, gligen: bool = False, seed: int = 0) -> Path:
    """Write the tiny random SD 1.x-style model to ``path`` (a GLIGEN UNet when ``gligen``)."""
    return build_random_sd(path, shape="tiny", gligen=gligen, seed=seed)


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


@pytest.fixture(scope="session")
def tiny_refiner_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model shaped like the SDXL refiner (``StableDiffusionXLImg2ImgPipeline``)."""
    return build_random_sdxl_refiner(tmp_path_factory.mktemp("tiny_refiner"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL base (``StableDiffusionXLPipeline``'s files: two text encoders, a ``text_time`` UNet)."""
    return build_random_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tiny_sdxl_path: Path):
    """The tiny SDXL base loaded once through ``LMDPipeline.from_pretrained`` (CPU, fp32)."""
    from grounded_sd import LMDPipeline

    torch.set_num_threads(1)
    return LMDPipeline.from_pretrained(tiny_sdxl_path, device="cpu")
