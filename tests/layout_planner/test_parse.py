"""Parsing LLM answers (JSON and the reference text format) and repairing layouts (docs/method.md §1.3-1.4)."""

import json
from pathlib import Path

import pytest

from layout_planner import (
    LayoutParseError,
    LLMBadOutput,
    PlannerError,
    build_layout,
    parse_answer,
    parse_layout_text,
    xywh_to_xyxy,
)
from layout_planner.read import Answer, AnswerObject

RESPONSES = Path(__file__).parents[1] / "data" / "llm_responses_gpt-3.5-turbo.json"


def test_bare_json_answer_keeps_ids_and_converts_boxes():
    text = json.dumps(
        {
            "objects": [{"id": "sofa", "phrase": "a grey sofa", "box": [20, 250, 280, 190]}],
            "background": "a living room",
            "negative": "people",
        }
    )
    layout = parse_layout_text(text)
    assert [(o.id, o.phrase) for o in layout.objects] == [("sofa", "a grey sofa")]
    assert layout.objects[0].box == xywh_to_xyxy([20, 250, 280, 190])
    assert (layout.background, layout.negative, layout.warnings) == ("a living room", "people", [])


def test_fenced_json_with_chatter_around_it():
    text = 'Sure! Here is the layout:\n```json\n{"objects": [{"id": "cup", "phrase": "a cup", "box": [10, 10, 100, 100]}], "background": "a table", "negative": ""}\n```\nEnjoy.'
    layout = parse_layout_text(text)
    assert layout.phrases() == ["a cup"] and layout.background == "a table"


def test_reference_text_format_assigns_ids_and_reads_none_as_empty_negative():
    text = "[('a cat', [10, 10, 100, 100]), ('a cat', [200, 10, 100, 100]), ('a red ball', [50, 300, 80, 80])]\nBackground prompt: A realistic garden\nNegative prompt: None"
    layout = parse_layout_text(text)
    assert [o.id for o in layout.objects] == ["cat", "cat_2", "ball"]
    assert layout.background == "A realistic garden" and layout.negative == ""


def test_reference_text_without_negative_and_with_objects_prefix():
    answer = parse_answer("Objects: [('a dog', [0, 0, 256, 256])]\nBackground prompt: a park")
    assert answer.negative == "" and answer.background == "a park" and not answer.has_ids
    assert parse_answer("[]\nBackground prompt: A realistic scene\nNegative prompt: backpacks").objects == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("I cannot draw that.", "neither a JSON object"),
        ('{"objects": [{"id": "a", "phrase": "a cat", "box": [1, 2', "not closed"),
        ('{"objects": [{"phrase": "a cat", "box": [1, 2, 3]}], "background": "x"}', "4 numbers"),
        ('{"background": "x"}', "no 'objects'"),
        ("[('a cat', [1, 2, 3, 4]) + ('a dog', [5, 6, 7, 8])]\nBackground prompt: x", "not a valid literal"),
        ("[('a cat', [1, 2, 3, 4]), ('a dog' [5, 6, 7, 8])]\nBackground prompt: x", "not a valid literal"),
        ("<think>a cat goes on the left, so [('a cat', [1, 2, 3, 4])", "only reasoning"),
        ("[('a cat', [1, 2, 3, 4])]\nBackground prompt: x\nBackground prompt: y", "more than one"),
        ("[('a cat', ['a', 2, 3, 4])]\nBackground prompt: x", "numbers only"),
    ],
)
def test_garbage_raises_a_parse_error_that_names_the_problem(text, message):
    with pytest.raises(LayoutParseError, match=message) as info:
        parse_layout_text(text)
    assert isinstance(info.value, LLMBadOutput) and isinstance(info.value, PlannerError)


def test_code_in_an_answer_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    text = f"[('a cat', [1, 2, 3, 4]), __import__('pathlib').Path({str(marker)!r}).touch()]\nBackground prompt: x"
    with pytest.raises(LayoutParseError):
        parse_layout_text(text)
    assert not marker.exists()


def _answer(*objects, **kwargs) -> Answer:
    return Answer(objects=[AnswerObject(phrase=p, box=b) for p, b in objects], **kwargs)


def test_repair_drops_empty_and_full_canvas_boxes_and_clips_the_rest():
    layout = build_layout(
        _answer(
            ("a cat", (10, 10, 0, 50)),
            ("a realistic scene", (0, 0, 512, 512)),
            ("a dog", (400, 300, 200, 300)),
            ("a bird", (600, 10, 50, 50)),
            ("a cup", (10, 10, 50, 50)),
        )
    )
    assert layout.phrases() == ["a dog", "a cup"]
    assert layout.objects[0].box == (400 / 512, 300 / 512, 1.0, 1.0)
    tags = [w.tag for w in layout.warnings]
    assert tags == ["dropped", "dropped", "clipped", "dropped"]
    assert "empty box" in layout.warnings[0].text and "whole canvas" in layout.warnings[1].text and "outside the canvas" in layout.warnings[3].text


def test_a_count_phrase_is_split_along_the_longer_side():
    layout = build_layout(_answer(("two red chairs", (100, 200, 300, 100))))
    assert layout.phrases() == ["a red chair", "a red chair"]
    (a, b) = (o.box for o in layout.objects)
    assert a[1] == b[1] and a[3] == b[3]  # side by side horizontally: the box was wider than tall
    assert (a[0], a[2], b[0], b[2]) == (100 / 512, 250 / 512, 250 / 512, 400 / 512)
    assert [str(w) for w in layout.warnings] == ["split: 'two red chairs' into 2 boxes of 'a red chair' along its longer side"]
    assert len({o.id for o in layout.objects}) == 2


def test_a_count_that_cannot_be_split_honestly_is_kept_and_warned():
    layout = build_layout(_answer(("twenty birds", (10, 10, 60, 40))))
    assert layout.phrases() == ["twenty birds"]
    assert str(layout.warnings[0]).startswith("count: 'twenty birds' names 20 objects in one box")


def test_the_object_count_is_capped():
    layout = build_layout(_answer(*[(f"a stone", (i * 10, 0, 10, 10)) for i in range(35)]), max_objects=30)
    assert len(layout.objects) == 30
    assert [str(w) for w in layout.warnings] == ["capped: kept the first 30 of 35 objects"]


def test_all_400_real_gpt35_answers_parse():
    responses = json.loads(RESPONSES.read_text())
    answers = [text for texts in responses.values() for text in texts]
    assert len(answers) == 400
    layouts = [parse_layout_text(text) for text in answers]
    for text, layout in zip(answers, layouts):  # every object is kept, unless a warning says otherwise
        written = len(parse_answer(text).objects)
        dropped = sum(w.tag == "dropped" for w in layout.warnings)
        added = sum(int(w.text.split(" into ")[1].split()[0]) - 1 for w in layout.warnings if w.tag == "split")
        assert len(layout.objects) == written - dropped + added, (text, layout.warnings)
    # the known defects of these answers are repaired, not silently kept
    warnings = [str(w) for layout in layouts for w in layout.warnings]
    assert any(w.startswith("split: 'two chairs'") for w in warnings)
    assert any(w.startswith("clipped:") for w in warnings)
    assert any("whole canvas" in w for w in warnings)


def test_overlong_texts_and_phrases_are_cut_with_a_warning():
    text = json.dumps(
        {"objects": [{"id": "a", "phrase": "a " + "very " * 60 + "big cat", "box": [1, 2, 30, 40]}], "background": "x" * 1500}
    )
    layout = parse_layout_text(text)
    assert len(layout.background) == 1000 and len(layout.objects[0].phrase) <= 200
    assert [w.tag for w in layout.warnings] == ["phrase", "text"]
