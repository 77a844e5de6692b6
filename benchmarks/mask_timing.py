"""Time ``grounded_sd.masks.object_mask`` (docs/method.md §2.4) per object, without and with SAM.

    .venv/bin/python benchmarks/mask_timing.py [--size 512] [--repeats 5] [--sam none|vit_b|CHECKPOINT --sam-type vit_b]

``--sam vit_b`` builds the published vit_b architecture with random weights (timing only:
SAM's cost does not depend on the weights); a checkpoint path loads real weights. SAM's
``set_image`` (the ViT at 1024 px) dominates; everything else is the attention map work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from grounded_sd.masks import MaskOptions, load_sam_predictor, object_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sam", default="none", help="none, vit_b (random weights) or a checkpoint path")
    parser.add_argument("--sam-type", default="vit_b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    predictor = None
    if args.sam == "vit_b":
        from segment_anything import SamPredictor, sam_model_registry

        predictor = SamPredictor(sam_model_registry["vit_b"]().to(args.device).eval())
    elif args.sam != "none":
        predictor = load_sam_predictor(args.sam, args.sam_type, args.device)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    rows, cols = np.mgrid[0:16, 0:16]
    attention = np.exp(-((rows - 8) ** 2 + (cols - 6) ** 2) / 6.0).astype(np.float32)
    box = (0.2, 0.25, 0.6, 0.8)
    for prompt in ("point", "box") if predictor else ("point",):
        object_mask(image, attention, box, predictor=predictor, prompt=prompt, options=MaskOptions())  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = object_mask(image, attention, box, predictor=predictor, prompt=prompt, options=MaskOptions())
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(
            f"sam={args.sam} prompt={prompt} size={args.size} device={args.device} threads={args.threads}: "
            f"median {1000 * statistics.median(times):.1f} ms, min {1000 * min(times):.1f} ms over {args.repeats} "
            f"(source {result.source})"
        )


if __name__ == "__main__":
    main()
