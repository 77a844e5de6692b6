"""A small captioned image set made on the spot: coloured shapes whose captions name their
colour and position ("a red square on the left"), as a folder of PNG + .txt or as JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
SIDES = ("left", "right")


def make_shapes(directory: Path | str, count: int = 16, size: int = 32, *, jsonl: bool = False, seed: int = 0) -> Path:
    """Write ``count`` images; return the folder, or the JSONL file when ``jsonl``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDES)
        image = Image.new("RGB", (size + 8 * (index % 3), size), (245, 245, 240))  # some not square: centre-cropped
        draw = ImageDraw.Draw(image)
        x0 = 2 if side == "left" else image.width // 2 + 2
        box = (x0, size // 4, x0 + image.width // 2 - 4, size * 3 // 4)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        caption = f"a {colour} {shape} on the {side}"
        name = f"shape_{index:03d}"
        image.save(directory / f"{name}.png")
        if jsonl:
            rows.append({"image": f"{name}.png", "caption": caption})
        else:
            (directory / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    if jsonl:
        path = directory / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    return directory
