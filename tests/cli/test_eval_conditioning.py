"""``lmd eval --conditioning ella``: run.json records it and the images are ELLA-conditioned
(the same pixels as the pipeline called directly with the tiny ELLA files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from layout_planner import Layout
from lmd.evaluation.runner import load_results
from tests.cli.test_eval_harness import RESPONSES, _eval


def test_eval_renders_with_the_named_conditioning(tmp_path: Path, tiny_sd_path: Path, tiny_owlvit_path: Path,
                                                  tiny_conditioning_files, monkeypatch):
    monkeypatch.setenv("LMD_ELLA_CHECKPOINT", str(tiny_conditioning_files["ella"]))
    monkeypatch.setenv("LMD_ELLA_T5", str(tiny_conditioning_files["t5"]))
    out = tmp_path / "ella"
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "1", "--conditioning", "ella") == 0
    results = load_results(out / "results.json")
    assert results.settings.conditioning == "ella"

    from grounded_sd import LMDOptions, LMDPipeline
    from grounded_sd.conditioning import ConditioningCache, ConditioningConfig

    pipe = LMDPipeline.from_pretrained(str(tiny_sd_path), device="cpu", dtype="float32")
    ella = ConditioningCache(
        ConditioningConfig(ella_checkpoint=str(tiny_conditioning_files["ella"]), ella_t5=str(tiny_conditioning_files["t5"])),
        device="cpu", dtype=torch.float32,
    ).get("ella")
    outcome = results.prompts[0]
    layout = Layout.model_validate_json((out / "layouts" / f"{outcome.index:03d}.json").read_text())
    direct = pipe(layout, seed=outcome.index, options=LMDOptions.fast(steps=2), width=64, height=64, conditioning=ella)
    assert np.array_equal(np.asarray(Image.open(out / outcome.image)), np.asarray(direct.image))
