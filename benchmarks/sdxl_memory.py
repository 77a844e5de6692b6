"""Peak memory of one guided step on SDXL 1.0's UNet (random weights, CPU): the forward to the
last guided layer and the backward to the latent, for ``rows`` objects at once, through the
controller's own code (``attention_forward``, ``energy_loss``, ``guide_latents``), with SDXL's
pooled embeddings and time ids. docs/models.md "SDXL" records its numbers.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/sdxl_memory.py --sizes 512 --rows 1 2 [--out F.json]

Memory is the process's resident set (``/proc/self/statm``) sampled every 5 ms while the step
runs, minus the resident set just before it (the UNet's weights and the inputs are already
there); glibc is told to return freed blocks (mmap threshold 64 KiB, ``malloc_trim``) so that
one measurement does not hide in the memory the previous one freed. It also counts the bytes
autograd saves (saved-tensor hooks, weights excluded, each storage once): the part of the peak
that grows with every guided row. The UNet alone is 2,567M parameters: 9.6 GiB in fp32.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import sys
import threading
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from grounded_sd import sdxl
from grounded_sd.attention import default_attention_layers, recording_attention
from grounded_sd.counters import UNetCounter
from grounded_sd.denoise import Run, attention_forward, energy_loss
from grounded_sd.guidance import EnergyTarget, guide_latents
from grounded_sd.options import LMDOptions
from grounded_sd.random_model import SDXL_UNET_CONFIG

PAGE = resource.getpagesize()


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakSampler:
    """The highest resident set seen while the block runs (a thread samples every ``interval`` s)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> "PeakSampler":
        self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def build_unet(dtype: torch.dtype):
    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL_UNET_CONFIG).to(dtype).eval().requires_grad_(False)


def guided_step(unet, layers: list[str], size: int, rows: int, dtype: torch.dtype, checkpointing: bool = False) -> dict:
    """One guidance iteration of ``rows`` per-box rows at ``size`` px; its memory and time."""
    latent = size // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, 4, latent, latent, generator=generator).to(dtype)
    cond = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator).to(dtype)
    pooled_width = unet.add_embedding.linear_1.in_features - sdxl.TIME_IDS * unet.config.addition_time_embed_dim  # 1280
    pooled = torch.randn(rows, pooled_width, generator=generator).to(dtype)
    box = (0.25, 0.25, 0.75, 0.75)
    targets = [EnergyTarget(f"object{i}", (5, 6, 7), box, (box,)) for i in range(rows)]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    scheduler.set_timesteps(50)
    options = LMDOptions.reference()
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in weights:
            saved.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    release()
    before = rss()
    started = time.perf_counter()
    with recording_attention(unet, layers, checkpointing=checkpointing) as recorder, PeakSampler() as sampler:
        run = Run(options, (latent, latent), layers, recorder, UNetCounter(unet), lambda *a: None, lambda: False,
                  time_ids=sdxl.time_ids(size, size, "cpu", dtype))
        forward = attention_forward(run, scheduler.timesteps[0], scheduler, cond, None, pooled)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            moved = guide_latents(
                latents, iterations=1, step_size=1.0, scale=options.loss_scale, threshold=-1.0, forward=forward,
                loss_fn=energy_loss(run, targets, None, final=False), counter=run.counter, max_batch=None,
            )
    wall = time.perf_counter() - started
    assert not torch.equal(moved, latents) and run.counter.total().backward == 1
    return {"size": size, "rows": rows, "checkpointing": checkpointing, "peak_above_weights_gib": (sampler.peak - before) / 2**30,
            "saved_activations_gib": sum(saved.values()) / 2**30, "process_peak_gib": sampler.peak / 2**30, "wall_s": wall}


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # large blocks must go back to the system when freed
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true", help="guidance_checkpointing: recompute the blocks in the backward")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    unet = build_unet(dtype)
    layers = default_attention_layers(unet)
    modules = dict(unet.named_modules())
    info = {
        "unet_parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6, "dtype": args.dtype, "threads": args.threads,
        "guided_layers": len(layers), "guided_heads": sorted({modules[name].heads for name in layers}),
        "weights_gib": sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**30, "build_s": time.perf_counter() - started,
    }
    print(json.dumps(info), flush=True)
    results = []
    for size in args.sizes:
        for rows in args.rows:
            results.append(guided_step(unet, layers, size, rows, dtype, args.checkpointing))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({**info, "layers": layers, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
