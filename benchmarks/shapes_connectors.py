"""Connectors trained on the shapes world, scored with its benchmark (issue 21; BENCHMARKS.md).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.shapes_connectors --work runs/shapes-connectors \\
        --model models/shapes [--scenes 3000 --train-steps 800 --batch 16 --limit 40 --eval-steps 20]

In ``--work`` it writes (once; delete a part to redo it):

- ``data/``: ``--scenes`` rendered scenes of ``lmd.shapes.world`` with one caption each, drawn as
  the world's model was trained (``world.caption``: full, object-only, spatial and negation
  captions and the null texts), an empty draw replaced by the full caption (the trainer makes its
  own empty captions, ``caption_dropout``);
- ``llm/``: a tiny random Qwen2-style LLM whose BPE makes every word of the world (and of the
  default instruction) one token; ``t5/``: a tiny random T5 encoder with a word-level vocabulary
  of the same words (no real weights are available offline);
- ``lidit.yaml``, ``ella.yaml``: the two runs' configs.

Then, unless ``--prepare-only``, for each kind it trains the connector (``<kind>/``) and exports
the untrained control (``<kind>-control/``, ``--steps 0``), runs ``lmd eval --world shapes``
(LMD ``--preset fast`` on the stored perfect layouts, and ``--baseline sd``: plain SD on the
prompt) with the model's own CLIP and with each connector, and prints one table. Every
``lmd`` command is printed before it runs; trainings and evals resume where they stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

KINDS = ("lidit", "ella")
LLM_WIDTH = 64  # the tiny LLM's and T5's hidden size (the world's UNet is 64 wide)
MAX_TOKENS = 32  # the world's longest caption is about 20 words
EVAL_MODES = {"fast": ["--preset", "fast"], "sd": ["--baseline", "sd"]}


def world_words() -> list[str]:
    """Every word and punctuation mark the world's captions and the default instruction use."""
    from grounded_sd.conditioning.llm import DEFAULT_INSTRUCTION
    from lmd.shapes import world

    text = " ".join(
        [*world.BACKGROUNDS, *world.COLOURS, *world.SHAPES, *map(world.plural, world.SHAPES), *world.NULL_WORDS,
         "a two three four five with without and on the to of left right top bottom above below", DEFAULT_INSTRUCTION]
    )
    words: list[str] = []
    for word in text.replace(",", " , ").replace(":", " : ").split():
        if word not in words:
            words.append(word)
    return words


def write_scenes(path: Path, count: int, seed: int = 0) -> None:
    """``NNNNN.png`` + ``NNNNN.txt``; written to a temporary name and renamed when complete."""
    from lmd.shapes import world

    partial = path.with_name(path.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = world.random_scene(rng)
        text = world.caption(scene, rng) or world.full_caption(scene, rng)
        world.render(scene).save(partial / f"{index:05d}.png")
        (partial / f"{index:05d}.txt").write_text(text + "\n", encoding="utf-8")
    partial.rename(path)


def prepare(work: Path, scenes: int) -> None:
    from grounded_sd.conditioning.random_encoders import build_random_t5
    from tests.support.tiny_lm import build_tiny_llm

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        write_scenes(work / "data", scenes)
    words = world_words()
    if not (work / "llm").exists():
        build_tiny_llm(work / "llm", hidden=LLM_WIDTH, words=words)
    if not (work / "t5").exists():
        build_random_t5(work / "t5", d_model=LLM_WIDTH, words=[w.lower() for w in words])


def config(work: Path, model: Path, kind: str, steps: int, batch: int) -> dict:
    """One run's config: the features and latents cached, 5% of the captions held out."""
    encoder = work / ("llm" if kind == "lidit" else "t5")
    return {
        "base_model": str(model.resolve()),
        "output_dir": str((work / kind).resolve()),
        "connector": {
            "kind": kind,
            "encoders": [{"model": str(encoder.resolve()), "max_tokens": MAX_TOKENS}],
            "refiner": {"blocks": 2, "cond_dim": 64},
            "ella": {"layers": 6, "heads": 8, "latents": 64},  # the released sizes, at the UNet's width
        },
        "data": {"path": str((work / "data").resolve()), "caption_dropout": 0.1, "cache_features": True, "cache_latents": True,
                 "holdout": 0.05, "num_workers": 0},
        "optimizer": {"lr": 3.0e-4, "warmup_steps": 50, "schedule": "constant"},
        "training": {"steps": steps, "batch_size": batch, "seed": 0, "checkpoint_every": 100, "log_every": 10,
                     "latents": "mean",  # the world's UNet was trained on the posterior's mean (lmd/shapes/train.py)
                     "tracker": "none"},
        "validation": {"every": max(steps // 4, 1), "steps": 20, "seeds": [0],
                       "prompts": ["a grey floor with a red circle on the left and a blue square on the right",
                                   "a blue sky with two yellow triangles"]},
    }


def run_lmd(args: list[str]) -> None:
    from lmd.cli import main as lmd

    print("$ lmd " + shlex.join(args), flush=True)
    status = lmd(args)
    if status != 0:
        raise SystemExit(f"lmd {args[0]} failed (exit {status})")


def train(work: Path, kind: str) -> None:
    """The trained connector (resumed when a checkpoint exists) and the untrained control."""
    out = work / kind
    if not (out / "summary.json").exists() or not (out / "connector").exists():
        resume = ["--resume", "latest"] if (out / "checkpoints").exists() else []
        run_lmd(["train-connector", "--config", str(work / f"{kind}.yaml"), "--quiet", *resume])
    control = work / f"{kind}-control"
    if not (control / "connector").exists():
        run_lmd(["train-connector", "--config", str(work / f"{kind}.yaml"), "--steps", "0", "--output", str(control), "--quiet"])


def evaluate(work: Path, model: Path, row: str, conditioning: str, mode: str, limit: int, steps: int) -> Path:
    out = work / "eval" / f"{row}-{mode}"
    run_lmd(["eval", "--world", "shapes", "--model", str(model), *EVAL_MODES[mode], "--steps", str(steps), "--limit", str(limit),
             "--conditioning", conditioning, "--method", f"{row} ({mode})", "--out", str(out)])
    return out


def reference_losses(work: Path, model: Path, k: int = 4, seed: int = 0) -> dict[str, float]:
    """The trainer's validation loss (its protocol: the held-out images' posterior means, ``k``
    evenly spread timesteps, image ``i``'s noise from seed ``seed * 1_000_003 + i``), with the
    model's own CLIP encoding each held-out caption, and with CLIP's empty prompt: where a
    connector's held-out loss stands between no text and the text encoder the UNet learned with."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from lmd.training.config import list_examples, split_holdout

    spec = json.loads((work / "lidit.yaml").read_text())
    _, held_out = split_holdout(list_examples(Path(spec["data"]["path"])), spec["data"]["holdout"])
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    timesteps = ((torch.arange(k) + 0.5) * scheduler.config.num_train_timesteps / k).long()
    totals = {"clip": 0.0, "empty": 0.0}
    with torch.no_grad():
        def encode(texts: list[str]) -> torch.Tensor:
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            return text_encoder(ids.input_ids)[0]

        empty = encode([""])
        for i, example in enumerate(held_out):
            pixels = torch.from_numpy(np.asarray(Image.open(example.image).convert("RGB"), dtype=np.float32) / 127.5 - 1)
            mean = vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist.mean
            latents = ((mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).repeat(k, 1, 1, 1)
            noise = torch.randn((k, *latents.shape[1:]), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            noisy = scheduler.add_noise(latents, noise, timesteps)
            for name, states in (("clip", encode([example.caption])), ("empty", empty)):
                pred = unet(noisy, timesteps, encoder_hidden_states=states.repeat(k, 1, 1)).sample
                totals[name] += float(((pred - noise) ** 2).mean(dim=(1, 2, 3)).sum())
    return {name: total / (len(held_out) * k) for name, total in totals.items()}


def table(work: Path, rows: list[tuple[str, Path]]) -> str:
    tasks = ("negation", "numeracy", "attribution", "spatial", "overall")
    lines = ["| row | " + " | ".join(tasks) + " | in box | found/image | train steps | s/step | train wall |", "|" + "---|" * (len(tasks) + 6)]
    for name, out in rows:
        results = json.loads((out / "results.json").read_text())
        cells = []
        for task in tasks:
            score = results["scores"].get(task)
            cells.append("-" if not score or score["accuracy"] is None else f"{100 * score['accuracy']:.1f}")
        placed = results["placement"]["overall"]
        found = sum(len(p["detections"]) for p in results["prompts"]) / max(1, len(results["prompts"]))
        cells += [f"{placed['hits']}/{placed['objects']}", f"{found:.2f}"]
        kind = name.split(" ")[0]
        summary_file = work / kind / "summary.json"
        cost = ["-", "-", "-"]
        if kind in KINDS and summary_file.exists() and "control" not in name:
            summary = json.loads(summary_file.read_text())
            wall, done = summary["train_wall_s"], summary.get("steps_this_run") or summary.get("steps")
            cost = [str(summary.get("steps")), f"{wall / done:.2f}" if done else "-", f"{wall / 60:.1f} min"]
        elif "control" in name:
            cost = ["0", "-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells + cost) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("models/shapes"), help="the shapes model (diffusers directory)")
    parser.add_argument("--scenes", type=int, default=3000)
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit", type=int, default=40, help="benchmark prompts (spread over the four tasks)")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--modes", nargs="+", choices=list(EVAL_MODES), default=list(EVAL_MODES))
    parser.add_argument("--no-clip", action="store_true", help="leave out the rows of the model's own text encoder")
    parser.add_argument("--prepare-only", action="store_true", help="write the data, the tiny models and the configs, then stop")
    parser.add_argument("--reference-losses", action="store_true",
                        help="only print the held-out validation loss of the model's own CLIP and of the empty prompt")
    parser.add_argument("--train-only", action="store_true", help="stop after training (no evals)")
    args = parser.parse_args()

    prepare(args.work, args.scenes)
    if args.reference_losses:
        print(json.dumps(reference_losses(args.work, args.model)))
        return
    for kind in args.kinds:
        path = args.work / f"{kind}.yaml"
        path.write_text(json.dumps(config(args.work, args.model, kind, args.train_steps, args.batch), indent=2))  # YAML reads JSON
        print(f"wrote {path}")
    if args.prepare_only:
        return
    for kind in args.kinds:
        train(args.work, kind)
    if args.train_only:
        return
    rows: list[tuple[str, Path]] = []
    for mode in args.modes:
        plan = [] if args.no_clip else [("clip", "clip")]
        for kind in args.kinds:
            plan += [(kind, f"connector:{args.work / kind / 'connector'}"),
                     (f"{kind} control", f"connector:{args.work / f'{kind}-control' / 'connector'}")]
        for row, conditioning in plan:
            out = evaluate(args.work, args.model, row.replace(" ", "-"), conditioning, mode, args.limit, args.eval_steps)
            rows.append((f"{row} ({mode})", out))
    print(table(args.work, rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
