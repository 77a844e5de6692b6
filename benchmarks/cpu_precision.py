"""One 3x3 convolution's forward and backward on the CPU in float32, bfloat16 and float16: why
``grounded_sd.pipeline.resolve_dtype`` refuses float16 on a CPU (guidance takes a backward
through the UNet at every guided step) and when bfloat16 pays (BENCHMARKS.md, "CPU precision").
With a model directory, also plain SD and LMD ``fast`` (1 object, 1 step) in float32 and
bfloat16, in CPU seconds (``time.process_time``: a shared core does not change them much).

    OMP_NUM_THREADS=1 python benchmarks/cpu_precision.py [MODEL_DIR [SIZE]]
"""

from __future__ import annotations

import sys
import time

import torch


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dtype)
        x = torch.randn(1, 64, 32, 32, dtype=dtype, requires_grad=True)
        for _ in range(2):  # warm-up
            conv(x).sum().backward()
        started = time.perf_counter()
        for _ in range(repeats):
            conv(x).sum().backward()
        print(f"{str(dtype).removeprefix('torch.')}: {(time.perf_counter() - started) / repeats * 1000:.1f} ms "
              "per forward+backward (64->64 channels, 3x3, 32x32, 1 thread)")


def whole_method(model: str, size: int) -> None:
    from grounded_sd import LMDOptions, LMDPipeline
    from lmd.bench import bench_layout

    for dtype in ("float32", "bfloat16"):
        pipe = LMDPipeline.from_pretrained(model, device="cpu", dtype=dtype)
        for variant in ("sd", "lmd"):
            started = time.process_time()
            pipe(bench_layout(1), seed=0, options=LMDOptions.fast(steps=1), variant=variant, width=size, height=size)
            print(f"{dtype} {variant} (1 object, 1 step, {size} px): {time.process_time() - started:.1f} CPU s")


if __name__ == "__main__":
    main()
    if len(sys.argv) > 1:
        whole_method(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256)
