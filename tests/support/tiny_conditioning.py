"""Tiny random conditioning files (T5 + ELLA connector, XLM-R + GlueNet) sized for the tiny SD
(32-d cross-attention), written once per test session in the released files' formats."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_WIDTH = 32  # the tiny SD's cross_attention_dim (tests/support/tiny_sd.py)


@pytest.fixture(scope="session")
def tiny_conditioning_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths: ``t5``, ``xlmr`` (directories), ``ella`` (.safetensors), ``gluenet_fr`` (.ckpt)."""
    from grounded_sd.conditioning.random_encoders import (
        build_random_t5,
        build_random_xlmr,
        tiny_ella_config,
        tiny_gluenet_config,
        write_random_ella,
        write_random_gluenet,
    )

    root = tmp_path_factory.mktemp("tiny_conditioning")
    return {
        "t5": build_random_t5(root / "t5", d_model=TINY_WIDTH),
        "xlmr": build_random_xlmr(root / "xlmr", hidden=TINY_WIDTH),
        "ella": write_random_ella(root / "ella.safetensors", tiny_ella_config(TINY_WIDTH, TINY_WIDTH)),
        "gluenet_fr": write_random_gluenet(root / "gluenet_fr.ckpt", tiny_gluenet_config(TINY_WIDTH, TINY_WIDTH)),
    }
