"""Answers shaped like other LLMs' (hand-written, tests/data/README.md) parse, and score as the published rules say.

The table below is the ground truth, written by hand from the answers in
``tests/data/llm_responses_synthetic.json``: how many boxes each answer writes and whether
it passes the published rule (and after our repair). Per-task numbers are computed from the
table, never by the scorer under test.
"""

import json
from pathlib import Path

import pytest

from layout_planner import LayoutParseError, Layout, parse_answer, parse_layout_text
from lmd.cli import main

SYNTHETIC = Path(__file__).parents[1] / "data" / "llm_responses_synthetic.json"
PREFIX = "A realistic photo of a scene "

# (prompt after PREFIX, boxes as written, passes the published rule, passes after repair, what the answer does)
EXPECTED = [
    ("without backpacks", 0, True, True, "chatter + ```json fence, empty objects"),
    ("without books", 0, True, True, "Objects: [] + **bold** labels"),
    ("without bottles", 2, True, True, "other objects, reference format"),
    ("without bowls", 2, False, False, "boxes the excluded object ('an empty bowl')"),
    ("without cars", 0, True, True, "<think> block holding a list and labels of its own"),
    ("without cats", 1, True, True, "lower-case labels, chatter after"),
    ("without chairs", 1, True, True, "JSON with // comment and trailing commas"),
    ("without cups", 1, True, True, "'name', 'bbox', 'background_prompt', negative as a list"),
    ("without dogs", 1, True, True, "Negative prompt line before Background prompt"),
    ("without laptops", 2, True, True, "JSON cut at max_tokens mid-object"),
    ("with one backpack", 1, True, True, "```python fence"),
    ("with one book", 1, True, True, "double-quoted tuple, Negative prompt: N/A"),
    ("with one book", 2, False, False, "two books for one"),
    ("with one cat", 1, True, True, 'box as {"x", "y", "w", "h"}'),
    ("with one laptop", 1, True, True, "x/y/width/height on the object itself"),
    ("with two backpacks", 2, True, True, "numbered tuple lines under Objects:"),
    ("with two bottles", 2, True, True, "bbox as corner keys (x1.. and xmin..)"),
    ("with two cups", 2, True, True, "a draft layout, then the corrected one"),
    ("with two dogs", 2, True, True, "Gemini box_2d [ymin, xmin, ymax, xmax] on 0..1000"),
    ("with two dogs", 1, False, True, "one box 'two dogs' (repair splits it)"),
    ("with three bottles", 3, True, True, "boxes as tuples, 'none.'"),
    ("with three cats", 3, True, True, "lists instead of tuples, float coordinates"),
    ("with three laptops", 3, True, True, "chatter with brackets before, no Negative line"),
    ("with four bowls", 4, True, True, "duplicated ids, unicode and \\u escapes"),
    ("with four cats", 3, False, False, '{"layout": {...}} wrapper, three cats for four'),
    ("with four chairs", 4, True, True, "list nested in a list"),
    ("with four chairs", 2, False, False, "reference list cut at max_tokens"),
    ("with four laptops", 4, True, True, "unescaped apostrophes ('a child's laptop')"),
    ("with five cars", 5, True, True, "a bare JSON list of objects, no background"),
    ("with five dogs", 5, True, True, "boxes as fractions of the canvas"),
    ("with a purple bowl and a blue dog", 2, True, True, "Claude-style chatter around a fence"),
    ("with a yellow bowl and a pink cup", 2, True, True, "Python dict with single quotes"),
    ("with a brown car and a yellow cat", 2, False, False, "drops the cat's colour"),
    ("with a gray dog and a blue backpack", 2, False, False, "'grey' is not the word 'gray'"),
    ("with a purple cup and a green car", 2, True, True, "reasoning with only the closing </think>"),
    ("with a white laptop and a red chair", 2, True, True, "**Objects:** and **Background Prompt:**"),
    ("with a yellow book and a pink bowl", 2, False, False, "colour in a trailing clause"),
    ("with a black car and an orange bottle", 2, True, True, "objects as [phrase, box] pairs in JSON"),
    ("with a yellow dog and a blue bowl", 2, True, True, "label values on the next line"),
    ("with a gray book and a red car", 2, True, True, "box numbers as strings"),
    ("with a blue backpack and a brown laptop", 2, True, True, "'description' key, one id missing"),
    ("with a purple cup and a red book", 2, True, True, "typographic quotes, em dash, café"),
    ("with a yellow bottle and a brown car", 2, False, False, "colours swapped"),
    ("with a blue car and a brown bowl", 2, True, True, "quoted label values"),
    ("with a bowl on the right and a cat on the left", 2, True, True, "plain reference format"),
    ("with a car on the left and a book on the right", 2, True, True, "```JSON, boxes given as corners"),
    ("with a car on the bottom and a laptop on the top", 2, False, False, "relation reversed"),
    ("with a backpack on the top and a bowl on the bottom", 2, True, True, "plain ``` fence around the text format"),
    ("with a book on the right and a bowl on the left", 2, True, True, "numeric ids, 'label' key"),
    ("with a dog on the left and a car on the right", 2, False, False, "both boxes cover the canvas"),
    ("with a backpack on the bottom and a cup on the top", 2, True, True, "<thinking> block"),
    ("with a cup on the top and a backpack on the bottom", 2, True, True, "JSON cut after the background"),
    ("with a chair on the left and a bottle on the right", 2, True, True, "multi-line literal, trailing comma"),
    ("with a dog on the bottom and a bowl on the top", 2, True, True, "'a dog sleeping on a rug'"),
    ("with a bowl on the right and a backpack on the left", 2, True, True, "bounding_box {left, top, right, bottom}"),
    ("with a car on the top and a laptop on the bottom", 2, True, True, "bulleted labels, Negative prompt: -"),
]


def _answers() -> list[tuple[str, int, str]]:
    responses = json.loads(SYNTHETIC.read_text(encoding="utf-8"))
    return [(prompt, k, text) for prompt, texts in responses.items() for k, text in enumerate(texts)]


def _task(suffix: str) -> str:
    if suffix.startswith("without"):
        return "negation"
    if " on the " in suffix:
        return "spatial"
    return "attribution" if " and " in suffix else "numeracy"


def test_the_table_matches_the_fixture():
    answers = _answers()
    assert [(prompt, k) for prompt, k, _ in answers] == [
        (PREFIX + suffix, sum(row[0] == suffix for row in EXPECTED[:i])) for i, (suffix, *_) in enumerate(EXPECTED)
    ]


@pytest.mark.parametrize("index", range(len(EXPECTED)), ids=[row[4] for row in EXPECTED])
def test_every_answer_parses_with_the_boxes_it_writes(index):
    suffix, boxes, *_ = EXPECTED[index]
    _, _, text = _answers()[index]
    answer = parse_answer(text)
    assert len(answer.objects) == boxes
    layout = parse_layout_text(text)
    assert isinstance(layout, Layout) and layout.background.strip()
    assert not layout.negative.lower().startswith(("none", "n/a", "-", "**")), layout.negative


def test_replaying_them_gives_the_score_the_published_rules_give(capsys):
    assert main(["eval-layouts", "--responses", str(SYNTHETIC), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parse_or_plan_errors"] == 0 and report["missing"] == 400 - len(EXPECTED)
    for key, column in (("published", 2), ("after_repair", 3)):
        for task in ("negation", "numeracy", "attribution", "spatial"):
            rows = [row for row in EXPECTED if _task(row[0]) == task]
            expected = (sum(row[column] for row in rows), len(rows))
            assert (report[key][task]["passed"], report[key][task]["total"]) == expected, (key, task)
        overall = (sum(row[column] for row in EXPECTED), len(EXPECTED))
        assert (report[key]["overall"]["passed"], report[key]["overall"]["total"]) == overall
    # answers whose reading was uncertain are counted by tag (cut at max_tokens x3, box_2d, fractions, ...)
    assert report["uncertain_readings"] == {"ambiguous": 1, "background": 1, "box": 1, "scale": 1, "truncated": 3}
    failed = sorted(f["prompt"] for f in report["failures"])
    assert failed == sorted(PREFIX + row[0] for row in EXPECTED if not row[2])


# --- what the readings mean (one variant each) -------------------------------------------------


def _by(what: str) -> str:
    index = next(i for i, row in enumerate(EXPECTED) if row[4] == what)
    return _answers()[index][2]


def test_labels_values_and_negatives_are_read_without_their_markup():
    layout = parse_layout_text(_by("Objects: [] + **bold** labels"))
    assert (layout.background, layout.negative) == ("A realistic photo of a cozy reading nook", "books")
    layout = parse_layout_text(_by("lower-case labels, chatter after"))
    assert layout.negative == "cats"  # not the chatter on the following lines
    layout = parse_layout_text(_by("label values on the next line"))
    assert (layout.background, layout.negative) == ("A realistic photo of a backyard", "")
    layout = parse_layout_text(_by("Negative prompt line before Background prompt"))
    assert (layout.background, layout.negative) == ("A realistic photo of a backyard lawn", "dogs")
    layout = parse_layout_text(_by("'name', 'bbox', 'background_prompt', negative as a list"))
    assert (layout.background, layout.negative) == ("a realistic photo of a kitchen counter", "cups, mugs")
    assert parse_layout_text(_by("quoted label values")).background == "A realistic photo of a driveway"


def test_reasoning_is_dropped_not_parsed():
    layout = parse_layout_text(_by("<think> block holding a list and labels of its own"))
    assert layout.objects == [] and layout.background == "A realistic photo of an empty street"
    assert layout.warnings == []


def test_box_shapes_are_converted_to_xywh():
    assert parse_answer(_by('box as {"x", "y", "w", "h"}')).objects[0].box == (150, 180, 210, 200)
    assert parse_answer(_by("x/y/width/height on the object itself")).objects[0].box == (130, 170, 250, 180)
    corners = parse_answer(_by("bbox as corner keys (x1.. and xmin..)"))
    assert [o.box for o in corners.objects] == [(120, 140, 100, 280), (290, 150, 100, 280)]
    assert parse_answer(_by("bounding_box {left, top, right, bottom}")).objects[0].box == (40, 160, 160, 240)
    assert parse_answer(_by("box numbers as strings")).objects[0].box == (40, 300, 150, 100)


def test_uncertain_readings_are_warnings_not_silent_guesses():
    gemini = parse_layout_text(_by("Gemini box_2d [ymin, xmin, ymax, xmax] on 0..1000"))
    assert gemini.objects[0].box == pytest.approx((0.08, 0.3, 0.45, 0.9))
    assert sum(str(w).startswith("box: read") and "box_2d" in w.text for w in gemini.warnings) == 2
    fractions = parse_layout_text(_by("boxes as fractions of the canvas"))
    assert fractions.objects[0].box == pytest.approx((0.02, 0.4, 0.2, 0.7))
    assert any(w.tag == "scale" for w in fractions.warnings)
    draft = parse_layout_text(_by("a draft layout, then the corrected one"))
    assert len(draft.objects) == 2 and str(draft.warnings[0]).startswith("ambiguous: the answer holds 2 different layouts")
    no_background = parse_layout_text(_by("a bare JSON list of objects, no background"))
    assert no_background.background == "a realistic scene" and no_background.warnings[0].tag == "background"
    corners = parse_layout_text(_by("```JSON, boxes given as corners"))
    assert all(w.tag == "clipped" and w.text.endswith("(it would fit as corners [x0, y0, x1, y1])") for w in corners.warnings)


def test_truncated_answers_keep_their_complete_objects_and_say_so():
    cut = parse_layout_text(_by("JSON cut at max_tokens mid-object"))
    assert cut.phrases() == ["a wooden desk", "a desk lamp"] and [o.id for o in cut.objects] == ["desk", "lamp"]
    assert str(cut.warnings[0]).startswith("truncated: the answer stops mid-way (cut at max_tokens?); kept its 2 complete object(s)")
    after_background = parse_layout_text(_by("JSON cut after the background"))
    assert after_background.background == "a realistic photo of a hallway"
    listed = parse_layout_text(_by("reference list cut at max_tokens"))
    assert listed.phrases() == ["a wooden chair"] * 2 and listed.warnings[0].tag == "truncated"
    with pytest.raises(LayoutParseError, match="not closed"):
        parse_layout_text('Here you go: {"objects": [{"id": "cat", "phrase": "a c')


def test_ids_numeric_duplicated_or_missing_become_unique_valid_ids():
    assert [o.id for o in parse_layout_text(_by("numeric ids, 'label' key")).objects] == ["1", "2"]
    bowls = parse_layout_text(_by("duplicated ids, unicode and \\u escapes"))
    assert [o.id for o in bowls.objects] == ["bowl", "bowl_2", "bowl_3", "bowl_4"]
    assert sum(str(w).startswith("id: replaced id 'bowl'") for w in bowls.warnings) == 3
    assert bowls.phrases()[2] == "a café au lait bowl" and bowls.background.endswith("京都")
    mixed = parse_layout_text(_by("'description' key, one id missing"))
    assert [o.id for o in mixed.objects] == ["backpack", "laptop"]


def test_apostrophes_and_python_quotes():
    laptops = parse_layout_text(_by("unescaped apostrophes ('a child's laptop')"))
    assert laptops.phrases()[2] == "a child's laptop" and len(laptops.objects) == 4
    assert parse_layout_text(_by("Python dict with single quotes")).phrases() == ["a yellow bowl", "a pink cup"]


def test_a_list_in_the_chatter_does_not_replace_the_layout():
    text = '{"objects": [{"phrase": "a cat", "box": [1, 2, 30, 40]}], "background": "a yard"}\nExcluded objects: []'
    layout = parse_layout_text(text)
    assert layout.phrases() == ["a cat"] and layout.warnings == []


def test_a_stray_bracket_in_the_chatter_does_not_hide_the_layout():
    text = 'Boxes are [x, y, w, h (pixels).\n{"objects": [{"phrase": "a cat", "box": [1, 2, 30, 40]}], "background": "a yard"}'
    assert parse_layout_text(text).phrases() == ["a cat"]


def test_json_keys_in_title_case():
    layout = parse_layout_text('{"Objects": [{"Phrase": "a cat", "Box": [1, 2, 30, 40]}], "Background": "a yard", "Negative": "N/A"}')
    assert (layout.phrases(), layout.background, layout.negative) == (["a cat"], "a yard", "")


def test_leniency_never_drops_text_silently():
    # Something that is not a ('phrase', box) item between or after items is an error, not skipped.
    with pytest.raises(LayoutParseError):
        parse_layout_text("[('a cat', [1, 2, 3, 4]), ('a dog', [5, 6, 7, 8]), os.system('x')]\nBackground prompt: x")
    with pytest.raises(LayoutParseError):
        parse_layout_text("[('a cat', [1, 2, 3, 4]) and also ('a dog', [5, 6, 7, 8])]\nBackground prompt: x")
    with pytest.raises(LayoutParseError, match="box must be"):
        parse_layout_text('{"objects": [{"phrase": "a cat", "box": {"cx": 1, "cy": 2, "r": 3}}]}')
