"""Scenes of the shapes world, their pixels and their captions (docs/shapes.md).

A scene is a background and 0-5 objects (a colour, a shape, a pixel box) on a 64x64 canvas.
Objects may overlap partly, but never two of the same colour (the detector finds objects as
connected regions of one colour). Everything here is pure Python + Pillow + NumPy: the
generator is seeded, so scenes, captions and boxes are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 225),
    "yellow": (240, 205, 40),
}
SHAPES = ("circle", "square", "triangle")
# name -> (top colour, bottom colour) of a vertical gradient; far from every object colour.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "a grey floor": ((150, 150, 150), (110, 110, 110)),
    "a blue sky": ((150, 195, 240), (205, 228, 250)),
    "a sandy beach": ((226, 208, 166), (206, 184, 140)),
    "a dark night": ((20, 22, 40), (45, 48, 75)),
}
MIN_SIDE, MAX_SIDE = 12, 26
MAX_OBJECTS = 5
_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
# Words that mean "no particular content" here: the controller's default negative prompts
# (grounded_sd.options), but "two", which counts in this world. Training on them as an empty
# caption makes a negative prompt of these words act like CFG's empty prompt instead of an
# untrained direction (our choice; the tiny model would never see such words otherwise).
NULL_WORDS = (
    "low quality", "blurry", "deformed", "disfigured", "bad anatomy", "watermark", "text",
    "duplicate", "many", "group", "occlusion", "occluded", "side", "border", "collate",
)  # fmt: skip


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # pixels, x0, y0, x1, y1 (exclusive)

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def normalised(self) -> tuple[float, float, float, float]:
        return tuple(v / SIZE for v in self.box)  # type: ignore[return-value]


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _gap(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Pixels between two boxes (0 when they touch or overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3], 0)


def fits(box: tuple[int, int, int, int], colour: str, placed: list[Thing], max_iou: float = 0.15) -> bool:
    """A box may overlap others a little, never one of its own colour (kept 3 px apart)."""
    for other in placed:
        if box_iou(box, other.box) > max_iou:
            return False
        if other.colour == colour and _gap(box, other.box) < 3:
            return False
        inside = (box[0] >= other.box[0] and box[1] >= other.box[1] and box[2] <= other.box[2] and box[3] <= other.box[3])
        covers = (box[0] <= other.box[0] and box[1] <= other.box[1] and box[2] >= other.box[2] and box[3] >= other.box[3])
        if inside or covers:
            return False
    return True


def random_box(rng: random.Random, side: int | None = None) -> tuple[int, int, int, int]:
    side = side or rng.randint(MIN_SIDE, MAX_SIDE)
    x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    return (x0, y0, x0 + side, y0 + side)


def random_scene(rng: random.Random) -> Scene:
    """One scene: the object count is drawn first, then (sometimes) a repeated shape for counting."""
    background = rng.choice(list(BACKGROUNDS))
    n = rng.choices(range(MAX_OBJECTS + 1), weights=(8, 26, 24, 16, 13, 13))[0]
    repeated = rng.choice(SHAPES) if n >= 2 and rng.random() < 0.45 else None
    placed: list[Thing] = []
    for index in range(n):
        shape = repeated if repeated and index < max(2, n - rng.randint(0, 1)) else rng.choice(SHAPES)
        for _ in range(50):
            colour = rng.choice(list(COLOURS))
            box = random_box(rng)
            if fits(box, colour, placed):
                placed.append(Thing(colour, shape, box))
                break
    return Scene(background, tuple(placed))


def render(scene: Scene) -> Image.Image:
    """The scene's pixels: the gradient, then each object in order (later ones on top)."""
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[scene.background])
    t = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - t) + bottom * t, (SIZE, SIZE, 3))
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        draw_thing(draw, thing, COLOURS[thing.colour])
    return image


def draw_thing(draw: ImageDraw.ImageDraw, thing: Thing, fill) -> None:
    """One object's shape in its box, filled with ``fill`` (a colour, or an index for masks)."""
    x0, y0, x1, y1 = thing.box
    if thing.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif thing.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1), fill=fill)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def plural(shape: str) -> str:
    return shape + "s"


def _listed(parts: list[str]) -> str:
    """``"a, b and c"``: the controller's own scene prompt style (grounded_sd.prompts.scene_prompt)."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def group_text(count: int, colour: str | None, shape: str) -> str:
    noun = shape if count == 1 else plural(shape)
    return " ".join(w for w in (_COUNT_WORDS[count], colour, noun) if w)


def full_caption(scene: Scene, rng: random.Random, *, with_colour: bool = True) -> str:
    """``"a grey floor with a red circle and two blue squares"``: every object, counted."""
    keys: list[tuple[str | None, str]] = []
    counts: dict[tuple[str | None, str], int] = {}
    for thing in scene.things:
        key = (thing.colour if with_colour else None, thing.shape)
        if key not in counts:
            keys.append(key)
            counts[key] = 0
        counts[key] += 1
    if not keys:
        return scene.background
    rng.shuffle(keys)
    return f"{scene.background} with {_listed([group_text(counts[k], k[0], k[1]) for k in keys])}"


def _relation(a: Thing, b: Thing) -> str | None:
    """How ``a`` stands to ``b`` when it is clear (centres 10 px apart), horizontal first."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= 10 and abs(ax - bx) >= abs(ay - by):
        return "left" if ax < bx else "right"
    if abs(ay - by) >= 10:
        return "top" if ay < by else "bottom"
    return None


_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def spatial_caption(scene: Scene, rng: random.Random) -> str | None:
    """For two-object scenes: ``"... with a red circle on the left and a square on the right"`` or
    ``"... with a red circle to the left of a blue square"`` (colour sometimes left out)."""
    if len(scene.things) != 2:
        return None
    a, b = scene.things if rng.random() < 0.5 else scene.things[::-1]
    relation = _relation(a, b)
    if relation is None:
        return None
    name = (lambda t: t.phrase) if rng.random() < 0.6 else (lambda t: f"a {t.shape}")
    if rng.random() < 0.7:
        return f"{scene.background} with {name(a)} on the {relation} and {name(b)} on the {_OPPOSITE[relation]}"
    words = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}[relation]
    return f"{scene.background} with {name(a)} {words} {name(b)}"


def negation_caption(scene: Scene, rng: random.Random) -> str | None:
    """``"a grey floor without circles"`` for a shape the scene does not have."""
    absent = [s for s in SHAPES if all(t.shape != s for t in scene.things)]
    if not absent:
        return None
    return f"{scene.background} without {plural(rng.choice(absent))}"


def null_text(rng: random.Random) -> str:
    """Some of ``NULL_WORDS`` in any order: ``"blurry, many, watermark"``."""
    return ", ".join(rng.sample(NULL_WORDS, rng.randint(1, len(NULL_WORDS))))


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of ``scene`` in one of the styles (weights: our choice), or a null text."""
    roll = rng.random()
    if roll < 0.08:
        return ""
    if roll < 0.11:
        return null_text(rng)
    if roll < 0.17 and scene.things:  # the objects alone, as users often write them
        return full_caption(scene, rng, with_colour=rng.random() < 0.8).split(" with ", 1)[1]
    if roll < 0.26:
        text = spatial_caption(scene, rng)
        if text:
            return text
    elif roll < 0.36:
        text = negation_caption(scene, rng)
        if text:
            return text
    return full_caption(scene, rng, with_colour=rng.random() < 0.8)
