"""The shapes world's scenes and captions, and the exact detector measured against ground truth."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from layout_planner.benchmark import evaluate, layout_detections, parse_benchmark_prompt
from layout_planner.layout import Layout
from lmd.shapes import SHAPES_PROMPTS, benchmark, detector, world


def _scenes(count: int, seed: int):
    rng = random.Random(seed)
    return [world.random_scene(rng) for _ in range(count)]


def test_scenes_are_reproducible_and_keep_same_colour_objects_apart():
    first, again = _scenes(200, 5), _scenes(200, 5)
    assert first == again
    counts = {len(s.things) for s in first}
    assert counts == set(range(world.MAX_OBJECTS + 1))
    for scene in first:
        for i, a in enumerate(scene.things):
            for b in scene.things[i + 1 :]:
                assert world.box_iou(a.box, b.box) <= 0.15
                if a.colour == b.colour:
                    assert world._gap(a.box, b.box) >= 3


def test_full_caption_counts_every_object_in_the_controllers_style():
    scene = world.Scene("a grey floor", (
        world.Thing("red", "circle", (2, 2, 16, 16)), world.Thing("red", "circle", (30, 2, 44, 16)),
        world.Thing("blue", "square", (2, 40, 20, 58)),
    ))  # fmt: skip
    texts = {world.full_caption(scene, random.Random(seed)) for seed in range(20)}
    assert texts == {"a grey floor with two red circles and a blue square", "a grey floor with a blue square and two red circles"}
    assert world.full_caption(scene, random.Random(0), with_colour=False) in {
        "a grey floor with two circles and a square", "a grey floor with a square and two circles"
    }


def test_spatial_and_negation_captions_say_what_the_pixels_show():
    left, right = world.Thing("red", "circle", (2, 20, 16, 34)), world.Thing("blue", "square", (40, 20, 54, 34))
    scene = world.Scene("a blue sky", (left, right))
    for seed in range(30):
        text = world.spatial_caption(scene, random.Random(seed))
        assert text is not None
        if "on the left" in text:
            assert text.index("on the left") > text.index("circle") and "square on the right" in text
        if "to the left of" in text:
            assert text.index("circle") < text.index("to the left of") < text.index("square")
        if "to the right of" in text:
            assert text.index("square") < text.index("to the right of") < text.index("circle")
        negation = world.negation_caption(scene, random.Random(seed))
        assert negation == "a blue sky without triangles"


def test_detector_precision_and_recall_on_clean_scenes():
    """Ground truth from the generator: a detection is right when colour and shape match and IoU >= 0.5."""
    scores = detector.measure(300, seed=11)
    assert scores["objects"] > 600
    assert scores["precision"] >= 0.98 and scores["recall"] >= 0.98, scores


@pytest.mark.parametrize("shape", world.SHAPES)
def test_detector_names_each_shape_and_colour_with_its_box(shape):
    for colour in world.COLOURS:
        scene = world.Scene("a sandy beach", (world.Thing(colour, shape, (10, 20, 30, 40)),))
        (found,) = detector.detect(world.render(scene))
        assert (found.colour, found.shape) == (colour, shape)
        assert found.box == (10 / 64, 20 / 64, 30 / 64, 40 / 64)


def test_detector_ignores_backgrounds_and_specks():
    for background in world.BACKGROUNDS:
        assert detector.detect(world.render(world.Scene(background, ()))) == []
    image = world.render(world.Scene("a grey floor", (world.Thing("red", "square", (5, 5, 9, 9)),)))  # 16 px < min_area
    assert detector.detect(image) == []
    assert len(detector.detect(image, min_area=10)) == 1


def test_stored_prompt_set_is_what_the_generator_writes_and_perfect_layouts_pass():
    stored = [json.loads(line) for line in SHAPES_PROMPTS.read_text(encoding="utf-8").splitlines()]
    assert stored == json.loads(json.dumps(benchmark.make_prompts()))
    tasks = [row["task"] for row in stored]
    assert {t: tasks.count(t) for t in set(tasks)} == {"negation": 100, "numeracy": 100, "attribution": 100, "spatial": 100}
    for row in stored:
        spec = parse_benchmark_prompt(row["prompt"], row["task"])
        layout = Layout.model_validate(row["layout"])
        assert evaluate(spec, layout_detections(layout)).passed, row


def test_perfect_layouts_drawn_exactly_are_detected_in_their_boxes():
    """The detector reads the perfect layouts back from pixels: every object in its box."""
    from lmd.evaluation.placement import place

    stored = [json.loads(line) for line in SHAPES_PROMPTS.read_text(encoding="utf-8").splitlines()]
    colours = list(world.COLOURS)
    for row in stored[100::7]:
        layout = Layout.model_validate(row["layout"])
        things = []
        for k, obj in enumerate(layout.objects):
            words = obj.phrase.split()
            colour = words[1] if len(words) == 3 else colours[k % len(colours)]
            things.append(world.Thing(colour, words[-1], tuple(round(v * 64) for v in obj.box)))
        found = [d.as_rule_input() for d in detector.detect(world.render(world.Scene(layout.background, tuple(things))))]
        placements = place(layout, found)
        assert all(p.hit and p.centred for p in placements), (row["prompt"], placements)
        shifted = layout.model_copy(update={"objects": [o.model_copy(update={"box": (0.0, 0.0, 0.1, 0.1)}) for o in layout.objects]})
        assert not any(p.hit or p.centred for p in place(shifted, found))


def test_centred_counts_an_object_smaller_than_its_box_once():
    """IoU >= 0.5 misses a small object in the middle of its box; the centre criterion does not,
    and one detection serves one object (the nearer box's)."""
    from lmd.evaluation.placement import place

    layout = Layout.model_validate({"background": "a grey floor", "objects": [
        {"id": "a", "phrase": "a red circle", "box": [0.0, 0.0, 0.5, 0.5]},
        {"id": "b", "phrase": "a red circle", "box": [0.2, 0.2, 0.7, 0.7]},
        {"id": "c", "phrase": "a blue square", "box": [0.5, 0.5, 1.0, 1.0]},
    ]})  # fmt: skip
    found = [("red circle", (0.35, 0.35, 0.5, 0.5)), ("red square", (0.7, 0.7, 0.8, 0.8))]
    placed = {p.id: p for p in place(layout, found)}
    assert [placed[k].centred for k in "abc"] == [False, True, False]  # b's centre is nearer; the square is not a circle
    assert not any(p.hit for p in placed.values())


def test_colour_labels_reject_pixels_between_colours():
    pixels = np.array([[[220, 40, 40], [130, 120, 130], [40, 70, 225]]], dtype=np.uint8)
    assert detector.colour_labels(pixels).tolist() == [[0, -1, 2]]
