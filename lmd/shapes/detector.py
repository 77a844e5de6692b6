"""The shapes world's exact detector: objects found from pixels by colour, shapes by template.

No learned model: a pixel belongs to an object colour when it lies within ``colour_distance``
of that colour (RGB, Euclidean) and nearer to it than to the other object colours (every
background is far from every object colour, lmd.shapes.world). Each 4-connected region of one
colour with at least ``min_area`` pixels (at 64 px) is one object; its shape is the one whose
ideal mask, drawn in the region's bounding box, overlaps the region best (IoU, also the
detection's score). Two objects of one colour never touch in the world, so regions are objects.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lmd.shapes import world

_PALETTE = np.array(list(world.COLOURS.values()), dtype=np.float32)
_NAMES = list(world.COLOURS)


@dataclass(frozen=True)
class ShapeDetection:
    colour: str
    shape: str
    box: tuple[float, float, float, float]  # normalised xyxy
    score: float  # IoU with the ideal shape in the region's box
    area: int  # pixels at the image's own size

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def as_rule_input(self) -> tuple[str, tuple[float, float, float, float]]:
        return (self.name, self.box)


def colour_labels(pixels: np.ndarray, colour_distance: float = 70.0) -> np.ndarray:
    """Per pixel: the index of its object colour in ``world.COLOURS``, or -1."""
    distances = np.linalg.norm(pixels[:, :, None, :].astype(np.float32) - _PALETTE[None, None], axis=-1)
    nearest = distances.argmin(axis=-1)
    return np.where(distances.min(axis=-1) <= colour_distance, nearest, -1)


def regions(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, each as an (n, 2) array of (y, x) pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(np.array(pixels))
    return found


def ideal_mask(shape: str, width: int, height: int) -> np.ndarray:
    """The shape as world.render draws it, filling a ``width`` x ``height`` box."""
    image = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle((0, 0, width - 1, height - 1), fill=1)
    elif shape == "circle":
        draw.ellipse((0, 0, width - 1, height - 1), fill=1)
    else:
        draw.polygon(((width - 1) / 2, 0, width - 1, height - 1, 0, height - 1), fill=1)
    return np.asarray(image, dtype=bool)


def classify(region: np.ndarray) -> tuple[str, float, tuple[int, int, int, int]]:
    """(shape, IoU with its ideal mask, pixel box x0, y0, x1, y1) of one region."""
    y0, x0 = region.min(axis=0)
    y1, x1 = region.max(axis=0) + 1
    local = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    local[region[:, 0] - y0, region[:, 1] - x0] = True
    best, best_iou = "square", -1.0
    for shape in world.SHAPES:
        ideal = ideal_mask(shape, x1 - x0, y1 - y0)
        iou = float((ideal & local).sum() / max(1, (ideal | local).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou, (int(x0), int(y0), int(x1), int(y1))


def detect(image: Image.Image, *, min_area: int = 24, colour_distance: float = 70.0) -> list[ShapeDetection]:
    """Every object in ``image``, largest first. ``min_area`` is in pixels of a 64 px image
    and scales with the image's area."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    least = min_area * (height * width) / (world.SIZE * world.SIZE)
    labels = colour_labels(pixels, colour_distance)
    found = []
    for index, colour in enumerate(_NAMES):
        for region in regions(labels == index):
            if len(region) < least:
                continue
            shape, score, (x0, y0, x1, y1) = classify(region)
            found.append(ShapeDetection(colour, shape, (x0 / width, y0 / height, x1 / width, y1 / height), round(score, 4), len(region)))
    return sorted(found, key=lambda d: -d.area)


def draw_detections(image: Image.Image, detections: list[ShapeDetection], scale: int = 4) -> Image.Image:
    """``image`` enlarged ``scale`` times with each detection's box and name drawn on it."""
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for d in detections:
        box = (d.box[0] * big.width, d.box[1] * big.height, d.box[2] * big.width - 1, d.box[3] * big.height - 1)
        draw.rectangle(box, outline=(255, 255, 255), width=1)
        draw.text((box[0] + 2, box[1] + 1), f"{d.colour[0]}{d.shape[:3]}", fill=(255, 255, 255))
    return big


def detect_for_eval(image: Image.Image, queries: list[str]):
    """``lmd eval``'s detector interface: every object found, named ``"colour shape"`` (the
    benchmark's rules read the head noun and the colour from the name); ``queries`` are not
    needed, the detector finds everything."""
    from lmd.evaluation.detection import Detection

    return [Detection(name=d.name, box=d.box, score=d.score) for d in detect(image)]


def measure(scenes: int = 1000, seed: int = 123) -> dict[str, float]:
    """Precision and recall on generated scenes (a detection is right when colour and shape
    match a ground-truth object and their boxes overlap with IoU >= 0.5)."""
    import random

    rng = random.Random(seed)
    tp = fp = fn = 0
    for _ in range(scenes):
        scene = world.random_scene(rng)
        truth = [(t.colour, t.shape, t.normalised()) for t in scene.things]
        used: set[int] = set()
        for d in detect(world.render(scene)):
            match = next((j for j, (c, s, box) in enumerate(truth)
                          if j not in used and c == d.colour and s == d.shape and world.box_iou(box, d.box) >= 0.5), None)  # fmt: skip
            if match is None:
                fp += 1
            else:
                used.add(match)
                tp += 1
        fn += len(truth) - len(used)
    return {"objects": tp + fn, "true_positives": tp, "false_positives": fp, "missed": fn,
            "precision": round(tp / max(1, tp + fp), 4), "recall": round(tp / max(1, tp + fn), 4)}  # fmt: skip


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)))
