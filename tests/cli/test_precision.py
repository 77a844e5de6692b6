"""CPU precision rules (issue 24): float16 on a CPU is refused before any work, everywhere a
dtype is chosen (library, settings, `lmd generate`, `lmd worker`, `lmd bench`); bfloat16 runs
the whole method on a CPU, guidance of both passes included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from grounded_sd import LMDOptions, LMDPipeline, ModelLoadError
from grounded_sd.pipeline import CPU_FLOAT16_REFUSED, resolve_dtype
from lmd.cli import main
from tests.support.builders import park_layout_data, plain_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_library_refuses_float16_on_a_cpu_and_keeps_it_on_cuda(tiny_sd_path):
    with pytest.raises(ModelLoadError, match="float16 is refused on a CPU"):
        LMDPipeline.from_pretrained(tiny_sd_path, device="cpu", dtype="float16")
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16  # resolving needs no GPU
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_settings_refuse_float16_with_an_explicit_cpu():
    with pytest.raises(ValidationError, match="LMD_DTYPE=float16 with LMD_DEVICE=cpu"):
        plain_settings(device="cpu", dtype="float16")
    assert plain_settings(device="cuda", dtype="float16").dtype == "float16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is a CPU only without CUDA")
def test_generate_refuses_float16_on_a_cpu_before_planning(clean_env, capsys, monkeypatch):
    # a prompt, and an LLM endpoint nobody answers: had planning started, the error would be the planner's
    monkeypatch.setenv("LMD_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LMD_LLM_API_KEY", "k")
    code = main(["generate", "a cat", "--dtype", "float16", "--out", str(clean_env / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"lmd generate: error: {CPU_FLOAT16_REFUSED}"
    assert not (clean_env / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is a CPU only without CUDA")
def test_a_render_worker_refuses_float16_on_a_cpu_at_start(clean_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMD_")}
    env.update(LMD_DTYPE="float16", LMD_REDIS_URL="redis://127.0.0.1:9/0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "lmd", "worker", "--queues", "render"], env=env, cwd=clean_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"lmd worker: error: {CPU_FLOAT16_REFUSED}"


def test_bench_refuses_float16_on_a_cpu_before_building_a_model(clean_env, capsys):
    assert main(["bench", "--device", "cpu", "--dtype", "float16", "--steps", "1", "--objects", "1"]) == 2
    assert "float16 is refused on a CPU" in capsys.readouterr().err


def test_bfloat16_runs_the_whole_method_on_a_cpu(tiny_sd_path):
    pipe = LMDPipeline.from_pretrained(tiny_sd_path, device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    options = LMDOptions.fast(steps=5, loss_threshold=0.0)
    result = pipe(park_layout_data(), seed=2, options=options, width=64, height=64)
    report = result.report
    assert report.dtype == "bfloat16" and report.device == "cpu"
    assert [s.name for s in report.stages] == ["per_box", "masks", "final"]
    stages = {s.name: s.unet for s in report.stages}
    assert stages["per_box"].backward_samples > 0 and stages["final"].backward_samples > 0  # guidance in both passes
    for obj in report.objects:
        assert obj.per_box_energy.iterations > 0 and obj.final_energy.iterations > 0
        assert np.isfinite([obj.per_box_energy.start, obj.final_energy.start]).all()
    assert torch.isfinite(result.intermediates.final_latents).all()
    assert not any("not finite" in note for note in report.notes), report.notes
    assert np.asarray(result.image).std() > 0
