"""The LMD benchmark's four tasks in the shapes world, with the layouts a perfect planner gives.

``python -m lmd.shapes.benchmark`` writes ``benchmarks/data/shapes_prompts.jsonl``: 100 prompts
per task (negation, numeracy, attribution, spatial), drawn once from a fixed seed, worded as the
LMD benchmark words its prompts (so ``layout_planner.benchmark.parse_benchmark_prompt`` reads
them and its published rules score them), each with ``layout``: the boxes, phrases, background
and negative prompt that a perfect stage 1 would return.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lmd.shapes import world

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "shapes_prompts.jsonl"
SEED = 2024
PER_TASK = 100
_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _boxes(rng: random.Random, count: int, region=lambda box: True) -> list[tuple[int, int, int, int]]:
    """``count`` square pixel boxes of 14-24 px, 4 px apart, each accepted by ``region``."""
    while True:
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(200):
            box = world.random_box(rng, rng.randint(14, 24))
            if region(box) and all(world._gap(box, other) >= 4 for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes


def _layout(background: str, items: list[tuple[str, tuple[int, int, int, int]]], negative: str = "") -> dict:
    objects = [
        {"id": f"o{i + 1}", "phrase": phrase, "box": [round(v / world.SIZE, 4) for v in box]} for i, (phrase, box) in enumerate(items)
    ]
    return {"objects": objects, "background": background, "negative": negative}


def negation(rng: random.Random) -> tuple[str, dict]:
    background, shape = rng.choice(list(world.BACKGROUNDS)), rng.choice(world.SHAPES)
    return f"{background} without {world.plural(shape)}", _layout(background, [], world.plural(shape))


def numeracy(rng: random.Random) -> tuple[str, dict]:
    background, shape, count = rng.choice(list(world.BACKGROUNDS)), rng.choice(world.SHAPES), rng.randint(1, 5)
    prompt = f"{background} with {world.group_text(count, None, shape)}"
    return prompt, _layout(background, [(f"a {shape}", box) for box in _boxes(rng, count)])


def attribution(rng: random.Random) -> tuple[str, dict]:
    background = rng.choice(list(world.BACKGROUNDS))
    colours = rng.sample(list(world.COLOURS), 2)
    shapes = rng.sample(world.SHAPES, 2)
    phrases = [f"a {c} {s}" for c, s in zip(colours, shapes)]
    return f"{background} with {phrases[0]} and {phrases[1]}", _layout(background, list(zip(phrases, _boxes(rng, 2))))


def spatial(rng: random.Random) -> tuple[str, dict]:
    background = rng.choice(list(world.BACKGROUNDS))
    first, second = rng.sample(world.SHAPES, 2)
    relation = rng.choice(list(_OPPOSITE))
    axis = 0 if relation in ("left", "right") else 1

    def side(which: str):
        lower = which in ("left", "top")
        return lambda box: (box[axis] + box[axis + 2]) / 2 < world.SIZE / 2 - 6 if lower else (box[axis] + box[axis + 2]) / 2 > world.SIZE / 2 + 6

    box_a = _boxes(rng, 1, side(relation))[0]
    box_b = next(b for b in (_boxes(rng, 1, side(_OPPOSITE[relation]))[0] for _ in range(100)) if world._gap(b, box_a) >= 4)
    prompt = f"{background} with a {first} on the {relation} and a {second} on the {_OPPOSITE[relation]}"
    return prompt, _layout(background, [(f"a {first}", box_a), (f"a {second}", box_b)])


TASKS = {"negation": negation, "numeracy": numeracy, "attribution": attribution, "spatial": spatial}


def make_prompts(seed: int = SEED, per_task: int = PER_TASK) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for task, make in TASKS.items():
        for _ in range(per_task):
            prompt, layout = make(rng)
            rows.append({"index": len(rows), "task": task, "prompt": prompt, "layout": layout})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmd.shapes.benchmark", description="write the shapes benchmark's prompt set")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    rows = make_prompts(args.seed)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"{len(rows)} prompts written to {args.out}")


if __name__ == "__main__":
    main()
