"""`lmd bench` on the tiny local model: the table's structure and the counted UNet work."""

import json

import pytest

from lmd.cli import main


def test_bench_counts_unet_work_per_run(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--model", str(tiny_sd_path), "--steps", "2", "--width", "32", "--height", "32",
        "--objects", "1", "2", "--presets", "fast", "--variants", "lmd", "lmd_plus", "--threads", "1", "--out", str(out),
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "| sd | - |" in table and "| lmd fast | 2 |" in table
    assert "lmd_plus skipped" in table  # the tiny model has no GLIGEN layers
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["variant"], r["objects"]) for r in runs] == [("sd", 3), ("lmd", 1), ("lmd", 2)]
    baseline, one, two = runs
    assert baseline["ratio_to_sd"] == 1.0
    assert baseline["forward_samples"] == 2 * 2  # steps x (cond + uncond)
    assert baseline["backward_samples"] == 0
    # the per-box pass batches all objects x CFG: twice the objects, twice its forward samples
    assert two["stages"]["per_box"]["forward_samples"] == 2 * one["stages"]["per_box"]["forward_samples"]
    assert one["backward_samples"] > 0 and one["ratio_to_sd"] > 0
    # CPU seconds beside wall seconds (steadier on a shared machine): LMD does more work than plain SD
    assert baseline["cpu_ratio_to_sd"] == 1.0 and two["cpu_s"] > baseline["cpu_s"] > 0
    assert two["cpu_ratio_to_sd"] == pytest.approx(two["cpu_s"] / baseline["cpu_s"])
    assert result["machine"]["torch"] and result["memory_kind"] == "rss"
    assert 0.0 <= one["outside_unet_fraction"] < 1.0
    # peak memory per stage, from the kernel's peak RSS reset at every step (no sampling)
    assert set(baseline["stage_peak_memory_mib"]) == {"sd", "decode"}
    assert set(one["stage_peak_memory_mib"]) == {"per_box", "masks", "final", "decode"}
    for run in runs:
        assert run["peak_memory_mib"] == max(run["stage_peak_memory_mib"].values()) > 0


def test_bench_real_size_needs_clips_vocabulary_before_building(clean_env, capsys):
    assert main(["bench", "--real-size", "--clip-vocab", str(clean_env / "missing.whl"), "--steps", "1", "--objects", "1"]) == 2
    err = capsys.readouterr().err
    assert "CLIP's vocabulary for the real-size model" in err and "missing.whl" in err


@pytest.mark.parametrize("args, message", [(["--objects", "5"], "--objects"), (["--width", "100"], "width")])
def test_bench_rejects_bad_arguments(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_measures_a_conditioning_over_clip(tiny_sd_path, tiny_conditioning_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMD_ELLA_CHECKPOINT", str(tiny_conditioning_files["ella"]))
    monkeypatch.setenv("LMD_ELLA_T5", str(tiny_conditioning_files["t5"]))
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--model", str(tiny_sd_path), "--steps", "2", "--width", "32", "--height", "32", "--objects", "2",
        "--presets", "fast", "--variants", "lmd", "--threads", "1", "--conditioning", "ella", "--out", str(out),
    ])
    assert code == 0
    assert "| lmd fast +ella | 2 |" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert [(r["variant"], r["conditioning"]) for r in runs] == [("sd", "clip"), ("lmd", "clip"), ("lmd", "ella")]
    clip, ella = runs[1], runs[2]
    # replace mode: the per-box pass reads the masks' attention from extra CLIP forwards (stopped early)
    assert ella["stages"]["per_box"]["forward_samples"] > clip["stages"]["per_box"]["forward_samples"]
    assert ella["stages"]["final"]["forward_samples"] == clip["stages"]["final"]["forward_samples"]
