"""The released files, where a user has them (paths from environment variables; skipped
cleanly otherwise): strict loading of the ELLA connector and a GlueNet checkpoint (CPU is
enough), and a full LMD run with each on a CUDA GPU with the real SD 1.5.

- LMD_TEST_ELLA_CHECKPOINT: ella-sd1.5-tsc-t5xl.safetensors; LMD_TEST_T5: a FLAN-T5-XL directory
- LMD_TEST_GLUENET_ZH: gluenet_Chinese_clip_overnorm_over3_noln.ckpt; LMD_TEST_XLMR: xlm-roberta-large
- LMD_TEST_SD_MODEL: an SD 1.x model (for the GPU runs)
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from grounded_sd.conditioning.ella import ELLA, ELLAConfig
from grounded_sd.conditioning.gluenet import GlueNet, GlueNetConfig


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"set {name} to run this test with the released file")
    return value


def test_released_ella_connector_loads_strictly():
    module = ELLA.from_file(_env("LMD_TEST_ELLA_CHECKPOINT"), config=ELLAConfig())
    assert sum(p.numel() for p in module.parameters()) == 66_820_608


def test_released_gluenet_loads_strictly():
    module = GlueNet.from_file(_env("LMD_TEST_GLUENET_ZH"), config=GlueNetConfig())
    assert round(sum(p.numel() for p in module.parameters()) / 1e6, 1) == 50.2


LAYOUT = {
    "objects": [
        {"id": "cat", "phrase": "a grey cat", "box": [0.05, 0.35, 0.45, 0.95]},
        {"id": "ball", "phrase": "a red ball", "box": [0.55, 0.6, 0.85, 0.9]},
    ],
    "background": "a realistic living room",
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["ella", "gluenet"])
def test_lmd_with_the_released_conditioning_on_cuda(name):
    from grounded_sd import LMDOptions, LMDPipeline
    from grounded_sd.conditioning import ConditioningCache, ConditioningConfig

    pipe = LMDPipeline.from_pretrained(_env("LMD_TEST_SD_MODEL"), device="cuda")
    if name == "ella":
        config = ConditioningConfig(ella_checkpoint=_env("LMD_TEST_ELLA_CHECKPOINT"), ella_t5=_env("LMD_TEST_T5"))
    else:
        config = ConditioningConfig(gluenet_checkpoints={"zh": _env("LMD_TEST_GLUENET_ZH")}, gluenet_xlmr=_env("LMD_TEST_XLMR"))
    conditioning = ConditioningCache(config, device=pipe.device, dtype=pipe.dtype).get(name)
    result = pipe(LAYOUT, seed=1, options=LMDOptions.fast(steps=20, loss_threshold=0.0), conditioning=conditioning,
                  source_prompt="客厅里有一只灰猫和一个红球")
    assert np.isfinite(np.asarray(result.image, dtype=np.float32)).all()
    assert result.report.conditioning == name
    assert all(o.per_box_energy.start is not None for o in result.report.objects)
