"""``lmd bench``: what LMD costs over plain Stable Diffusion, measured the same way for every run.

For one model, step count, size and seed: plain SD, then LMD with 1..4 objects for each
variant and preset. Each run reports wall time, its ratio to plain SD on the same model,
peak memory (RSS on CPU, allocated on CUDA), the UNet forward and backward passes weighted
by batch size per stage (read from the pipeline's own counters, the numbers its report
shows), and the share of time spent outside UNet passes.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from grounded_sd.names import GROUNDED_VARIANTS, PRESETS, GroundedVariant, Preset
from layout_planner.layout import Layout, LayoutObject


# Four objects in distinct regions; a run with N objects takes the first N.
BENCH_OBJECTS = (
    LayoutObject(id="cat", phrase="a cat", box=(0.04, 0.40, 0.46, 0.96)),
    LayoutObject(id="dog", phrase="a dog", box=(0.54, 0.40, 0.96, 0.96)),
    LayoutObject(id="lamp", phrase="a red lamp", box=(0.06, 0.04, 0.36, 0.36)),
    LayoutObject(id="apple", phrase="a green apple", box=(0.62, 0.08, 0.90, 0.34)),
)
RANDOM_MODEL_LABELS = {
    "sd": "random-weight SD 1.x-shaped model (built in-process; timings only, images are noise)",
    "sd15": (
        "random-weight model of SD 1.5's exact architecture (859.5M UNet, 1,068.6M with GLIGEN; CLIP ViT-L/14 text "
        "encoder and tokenizer; built in-process; time and memory of the real model, images are noise)"
    ),
}


class BenchConfig(BaseModel):
    model: str | None = Field(None, description="hub id or local directory; None: a random model of ``shape``")
    shape: Literal["sd", "sd15"] = Field(
        "sd", description="the random model without ``model``: sd (SD 1.x's shape, narrow) or sd15 (SD 1.5's real size)"
    )
    clip_vocab: str | None = Field(
        None, description="sd15: CLIP's BPE file or the open-clip-torch wheel holding it; None: the installed open_clip's"
    )
    steps: int = Field(20, ge=1, le=1000)
    width: int = Field(256, ge=32, le=2048, multiple_of=8)
    height: int = Field(256, ge=32, le=2048, multiple_of=8)
    seed: int = Field(0, ge=0)
    objects: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    variants: list[GroundedVariant] = Field(default_factory=lambda: list(GROUNDED_VARIANTS))
    presets: list[Preset] = Field(default_factory=lambda: list(PRESETS))
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default")
    conditioning: str = Field(
        "clip",
        description=(
            "other than clip: every LMD run is measured again with this conditioning (its cost over CLIP); with the "
            "random model, random encoders of the same structure are built (timings only)"
        ),
    )

    @field_validator("objects")
    @classmethod
    def _object_counts(cls, counts: list[int]) -> list[int]:
        if any(n < 1 or n > len(BENCH_OBJECTS) for n in counts):
            raise ValueError(f"each count must be between 1 and {len(BENCH_OBJECTS)}")
        return counts


class MachineInfo(BaseModel):
    cpu: str
    gpu: str | None
    torch: str
    threads: int
    python: str
    platform: str


class StageCost(BaseModel):
    wall_s: float
    forward: int
    forward_samples: int
    backward: int
    backward_samples: int
    unet_s: float


class BenchRun(BaseModel):
    variant: str
    preset: str | None
    conditioning: str = "clip"
    objects: int
    wall_s: float
    ratio_to_sd: float | None
    cpu_s: float = Field(0.0, description="this process's CPU seconds over the run (time.process_time: all its threads)")
    cpu_ratio_to_sd: float | None = Field(
        None, description="cpu_s over plain SD's: on a CPU that other work shares, steadier than the wall-time ratio"
    )
    peak_memory_mib: float
    stage_peak_memory_mib: dict[str, float] = Field(
        default_factory=dict, description="peak memory while each stage ran (its steps; 'decode': after the last stage)"
    )
    stages: dict[str, StageCost]
    forward_samples: int
    backward_samples: int
    outside_unet_fraction: float = Field(description="share of wall time outside UNet forwards and backwards")


class BenchResult(BaseModel):
    machine: MachineInfo
    model: str
    model_label: str
    memory_kind: Literal["rss", "cuda_allocated"]
    config: BenchConfig
    runs: list[BenchRun]
    notes: list[str] = Field(default_factory=list)


def bench_layout(n_objects: int) -> Layout:
    if not 0 <= n_objects <= len(BENCH_OBJECTS):
        raise ValueError(f"objects must be between 0 and {len(BENCH_OBJECTS)}, got {n_objects}")
    return Layout(objects=list(BENCH_OBJECTS[:n_objects]), background="a realistic living room")


def machine_info(device: str) -> MachineInfo:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = f"{cpu} ({os.cpu_count()} cores)"
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return MachineInfo(
        cpu=cpu, gpu=gpu, torch=torch.__version__, threads=torch.get_num_threads(),
        python=platform.python_version(), platform=platform.platform(),
    )


class PeakMemory:
    """Peak memory during a block, and per stage, read from counters the kernel or CUDA keep
    (no sampling, so nothing depends on timing): the CUDA allocator's peak, or on a CPU the
    process's peak RSS (``VmHWM``), which Linux resets on writing 5 to /proc/self/clear_refs.

    Before the block, free heap memory is handed back to the system (glibc ``malloc_trim``), so
    that memory an earlier run freed but the allocator kept does not count as this run's.
    :meth:`mark` closes a stage: the peak since the previous mark is that stage's. Where the
    peak RSS cannot be reset (not Linux), every number is the process's peak so far
    (``resource.getrusage``)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.resettable = self.cuda or peak_rss_supported()
        self.peak_bytes = 0
        self.stage_peaks: dict[str, int] = {}

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            release_free_heap()
        self._reset()
        return self

    def mark(self, stage: str) -> None:
        peak = self._peak()
        self.stage_peaks[stage] = max(self.stage_peaks.get(stage, 0), peak)
        self.peak_bytes = max(self.peak_bytes, peak)
        self._reset()

    def __exit__(self, *exc_info) -> None:
        self.mark("decode")  # what follows the last stage's last step: the final image's decode

    def _reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def _peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if not self.resettable:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("/proc/self/status has no VmHWM line")


def peak_rss_supported() -> bool:
    """Whether this system can reset and read the process's peak RSS (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM:" in Path("/proc/self/status").read_text()
    except OSError:
        return False


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc); elsewhere a no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _measure(pipe, layout: Layout, *, variant: str, preset: Preset | None, config: BenchConfig, device: str,
             conditioning=None) -> BenchRun:
    from grounded_sd import LMDOptions
    from grounded_sd.prompts import group_phrases, scene_prompt

    options = LMDOptions.preset(preset or "reference", steps=config.steps)
    source = scene_prompt(layout.background, group_phrases(layout))  # what GlueNet reads (in "en" on the random model)
    with PeakMemory(device) as memory:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = pipe(layout, seed=config.seed, options=options, variant=variant, width=config.width, height=config.height,
                      conditioning=conditioning, source_prompt=source, progress=lambda stage, step, total: memory.mark(stage))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stages = {
        s.name: StageCost(
            wall_s=s.wall_s, forward=s.unet.forward, forward_samples=s.unet.forward_samples, backward=s.unet.backward,
            backward_samples=s.unet.backward_samples, unet_s=s.unet.forward_s + s.unet.backward_s,
        )
        for s in result.report.stages
    }
    total = result.report.unet_total
    unet_s = total.forward_s + total.backward_s
    return BenchRun(
        variant=variant, preset=preset, conditioning=result.report.conditioning, objects=len(layout.objects), wall_s=wall, ratio_to_sd=None, cpu_s=cpu,
        peak_memory_mib=memory.peak_bytes / 2**20, stage_peak_memory_mib={k: v / 2**20 for k, v in memory.stage_peaks.items()}, stages=stages, forward_samples=total.forward_samples,
        backward_samples=total.backward_samples, outside_unet_fraction=max(0.0, 1.0 - unet_s / wall),
    )


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run every configured measurement; ``progress`` is told the name of each run as it starts."""
    from grounded_sd import LMDPipeline
    from grounded_sd.pipeline import resolve_device, resolve_dtype
    from grounded_sd.random_model import build_random_sd
    from lmd import wiring

    wiring.use_torch_threads(config.threads)
    wiring.quiet_library_progress_bars()  # the command's bar counts the runs
    torch_device = resolve_device(config.device)
    resolve_dtype(config.dtype, torch_device)  # float16 on a CPU is refused before any model is built
    device = str(torch_device)
    progress = progress or (lambda name: None)
    notes: list[str] = []
    runs: list[BenchRun] = []

    if config.model is None and config.shape == "sd15":  # a missing vocabulary fails before minutes of model building
        from grounded_sd import ModelLoadError
        from grounded_sd.clip_vocab import clip_vocab_and_merges, find_open_clip_bpe

        try:
            clip_vocab_and_merges(config.clip_vocab or find_open_clip_bpe())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"CLIP's vocabulary for the real-size model: {exc}".splitlines()[0]) from exc

    with tempfile.TemporaryDirectory(prefix="lmd-bench-") as scratch:
        if config.model is None:
            model_label = RANDOM_MODEL_LABELS[config.shape]
            build = {"shape": config.shape, "seed": config.seed, "clip_vocab": config.clip_vocab}
            models = {
                variant: build_random_sd(Path(scratch) / variant, gligen=variant == "lmd_plus", **build) for variant in config.variants
            }
        else:
            model_label = f"{config.model} (as given)"
            models = {"lmd": config.model, "lmd_plus": config.model}

        for variant in config.variants:
            pipe = LMDPipeline.from_pretrained(models[variant], device=config.device, dtype=config.dtype)
            if variant == "lmd_plus" and not pipe.supports_gligen:
                notes.append(f"lmd_plus skipped: {config.model} has no GLIGEN gated attention")
                continue
            label = "sd" if variant == "lmd" else "sd (GLIGEN model)"
            # Warm-up: first calls pay for allocator growth and lazy initialisation.
            pipe(bench_layout(1), seed=config.seed, options=_warmup_options(), variant=variant, width=config.width, height=config.height)
            conditioning = None
            if config.conditioning != "clip":
                conditioning = _bench_conditioning(config, pipe, Path(scratch))
                pipe(bench_layout(1), seed=config.seed, options=_warmup_options(), variant=variant, width=config.width,
                     height=config.height, conditioning=conditioning, source_prompt="a cat")
            progress(label)
            baseline = _measure(pipe, bench_layout(3), variant="sd", preset=None, config=config, device=device)
            baseline.variant = label
            baseline.ratio_to_sd = baseline.cpu_ratio_to_sd = 1.0
            runs.append(baseline)
            for preset in config.presets:
                for n_objects in config.objects:
                    progress(f"{variant} {preset} {n_objects} object(s)")
                    run = _measure(pipe, bench_layout(n_objects), variant=variant, preset=preset, config=config, device=device)
                    run.ratio_to_sd, run.cpu_ratio_to_sd = run.wall_s / baseline.wall_s, run.cpu_s / baseline.cpu_s
                    runs.append(run)
                    if conditioning is not None:
                        progress(f"{variant} {preset} {n_objects} object(s) {config.conditioning}")
                        run = _measure(pipe, bench_layout(n_objects), variant=variant, preset=preset, config=config, device=device,
                                       conditioning=conditioning)
                        run.ratio_to_sd, run.cpu_ratio_to_sd = run.wall_s / baseline.wall_s, run.cpu_s / baseline.cpu_s
                        runs.append(run)
            del pipe

    return BenchResult(
        machine=machine_info(device), model=config.model or f"random:{config.shape}", model_label=model_label,
        memory_kind="cuda_allocated" if device.startswith("cuda") else "rss", config=config, runs=runs, notes=notes,
    )


def _bench_conditioning(config: BenchConfig, pipe, scratch: Path):
    """The conditioning to measure: from the settings' files with a given model; random encoders
    sized to the random model (timings only) without one."""
    from grounded_sd.conditioning import ConditioningCache, ConditioningConfig
    from grounded_sd.conditioning import random_encoders as rnd
    from lmd import wiring

    if config.model is not None:
        cache = ConditioningCache(wiring.conditioning_config(wiring.load_settings()), device=pipe.device, dtype=pipe.dtype)
        return cache.get(config.conditioning)
    width = pipe.unet.config.cross_attention_dim
    files = ConditioningConfig(
        ella_checkpoint=str(rnd.write_random_ella(scratch / "ella.safetensors", rnd.tiny_ella_config(width, width))),
        ella_t5=str(rnd.build_random_t5(scratch / "t5", d_model=width)),
        gluenet_checkpoints={"en": str(rnd.write_random_gluenet(scratch / "gluenet.ckpt", rnd.tiny_gluenet_config(width, width)))},
        gluenet_xlmr=str(rnd.build_random_xlmr(scratch / "xlmr", hidden=width)),
    )
    return ConditioningCache(files, device=pipe.device, dtype=pipe.dtype).get(config.conditioning)


def _warmup_options():
    from grounded_sd import LMDOptions

    return LMDOptions.fast(steps=1)


def format_table(result: BenchResult) -> str:
    """A markdown table (it reads fine on a terminal too), preceded by the machine and model."""
    m = result.machine
    memory = "peak RSS MiB" if result.memory_kind == "rss" else "peak CUDA MiB"
    lines = [
        f"model: {result.model_label}",
        f"machine: CPU {m.cpu}; GPU {m.gpu or 'none'}; torch {m.torch}; {m.threads} thread(s); Python {m.python}",
        f"steps {result.config.steps}, {result.config.width}x{result.config.height}, seed {result.config.seed}",
        "",
        f"| run | objects | wall s | x SD | CPU s | x SD (CPU) | {memory} | UNet fwd samples (per_box/final) | UNet bwd samples (per_box/final) | outside UNet |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result.runs:
        name = run.variant if run.preset is None else f"{run.variant} {run.preset}"
        if run.conditioning != "clip":
            name += f" +{run.conditioning}"
        per_box, final = run.stages.get("per_box"), run.stages.get("final")
        fwd = f"{run.forward_samples}" + (f" ({per_box.forward_samples}/{final.forward_samples})" if per_box and final else "")
        bwd = f"{run.backward_samples}" + (f" ({per_box.backward_samples}/{final.backward_samples})" if per_box and final else "")
        lines.append(
            f"| {name} | {run.objects if run.preset else '-'} | {run.wall_s:.2f} | {run.ratio_to_sd:.2f} | {run.cpu_s:.2f} | "
            f"{'-' if run.cpu_ratio_to_sd is None else f'{run.cpu_ratio_to_sd:.2f}'} | "
            f"{run.peak_memory_mib:.0f} | {fwd} | {bwd} | {run.outside_unet_fraction:.1%} |"
        )
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
