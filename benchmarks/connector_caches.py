"""What the latent cache saves in ``lmd train-connector``, on the shapes world's model topology.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.connector_caches --work /tmp/connector-caches

Builds, in ``--work``, the shapes model's topology with random weights (lmd.shapes.model), a
tiny Qwen2-style LLM (tests.support.tiny_lm) and ``--images`` rendered shapes-world scenes with
their full captions; then trains the same LI-DiT-style connector twice, with the feature cache
both times and the latent cache the second time, and prints each run's training-loop wall time
(``summary.json``) and whether the losses agree. Random weights: this times the loop, it says
nothing about what a connector learns.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

from lmd.cli import main as lmd
from lmd.shapes import model as shapes_model
from lmd.shapes import world
from tests.support.tiny_lm import build_tiny_llm


def prepare(work: Path, images: int) -> tuple[Path, Path, Path]:
    llm, model, data = work / "llm", work / "model", work / f"data-{images}"
    if not llm.exists():
        build_tiny_llm(llm)
    if not model.exists():
        torch.manual_seed(0)
        shapes_model.build_vae().save_pretrained(model / "vae")
        shapes_model.build_unet().save_pretrained(model / "unet")
        shapes_model.build_scheduler().save_pretrained(model / "scheduler")
    if not data.exists():
        data.mkdir(parents=True)
        rng = random.Random(0)
        for index in range(images):
            scene = world.random_scene(rng)
            world.render(scene).save(data / f"{index:04d}.png")
            (data / f"{index:04d}.txt").write_text(world.full_caption(scene, rng) + "\n", encoding="utf-8")
    return llm, model, data


def run(work: Path, name: str, llm: Path, model: Path, data: Path, *, steps: int, batch: int, cache_latents: bool) -> dict:
    out = work / name
    config = {
        "base_model": str(model), "output_dir": str(out),
        "connector": {"kind": "lidit", "encoders": [{"model": str(llm), "max_tokens": 24}]},
        "data": {"path": str(data), "num_workers": 0, "cache_features": True, "cache_latents": cache_latents},
        "training": {"steps": steps, "batch_size": batch, "tracker": "none", "checkpoint_every": 10**6},
        "validation": {"every": 10**6, "steps": 1},
    }
    (work / f"{name}.yaml").write_text(json.dumps(config))
    if lmd(["train-connector", "--config", str(work / f"{name}.yaml"), "--quiet"]) != 0:
        raise SystemExit(f"{name}: train-connector failed")
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    return {**json.loads((out / "summary.json").read_text()), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="models, data and runs (runs are redone)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    llm, model, data = prepare(args.work, args.images)
    results = {}
    for name, cache in (("encoded", False), ("cached", True)):
        shutil.rmtree(args.work / name, ignore_errors=True)
        results[name] = run(args.work, name, llm, model, data, steps=args.steps, batch=args.batch, cache_latents=cache)
    a, b = results["encoded"], results["cached"]
    agree = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    print(f"{args.images} images at 64 px, batch {args.batch}, {args.steps} steps, {a['device']}:")
    print(f"  VAE every step:  {a['train_wall_s']:.1f} s ({a['train_wall_s'] / args.steps:.2f} s/step)")
    print(f"  latent cache:    {b['train_wall_s']:.1f} s ({b['train_wall_s'] / args.steps:.2f} s/step)")
    print(f"  losses agree to a relative {agree:.1e}")


if __name__ == "__main__":
    main()
