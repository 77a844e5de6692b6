"""The LMD benchmark at layout level: specs, the published rules, and ``lmd eval-layouts``."""

import json
import re
from pathlib import Path

import pytest

from layout_planner.benchmark import (
    BenchmarkPromptError,
    attribution_rule,
    count_objects,
    evaluate,
    names_object,
    negation_rule,
    numeracy_rule,
    parse_benchmark_prompt,
    spatial_rule,
)
from lmd.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "benchmarks" / "data" / "prompts.jsonl"
RESPONSES = ROOT / "tests" / "data" / "llm_responses_gpt-3.5-turbo.json"


def test_replaying_gpt35_reproduces_the_published_scores(capsys):
    assert main(["eval-layouts", "--responses", str(RESPONSES), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    accuracy = {task: row["accuracy"] for task, row in report["published"].items()}
    assert accuracy == {"negation": 100.0, "numeracy": 97.0, "attribution": 100.0, "spatial": 99.0, "overall": 99.0}
    assert report["published"]["overall"] == {"passed": 396, "total": 400, "accuracy": 99.0}
    assert report["parse_or_plan_errors"] == 0 and report["missing"] == 0
    # Why they fail: one cat given as a whole-canvas box (dropped); "two chairs" in one box, twice
    # (a box is one object); both spatial objects given as whole-canvas boxes.
    reasons = {f["index"]: f["reason"] for f in report["failures"]}
    assert reasons == {
        111: "0 box(es) name 'cat', expected exactly 1",
        132: "1 box(es) name 'chair', expected exactly 2",
        133: "1 box(es) name 'chair', expected exactly 2",
        306: "no box names 'dog' or 'bowl'",
    }
    # Our repair splits "two chairs" into two boxes: reported apart from the published score.
    assert report["after_repair"]["numeracy"]["accuracy"] == 99.0
    assert report["strict"]["inside_canvas"]["passed"] < 400


def test_the_table_is_readable_and_prompts_resolve_relative_to_the_repo(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default --prompts and a repo-relative path still resolve
    assert main(["eval-layouts", "--responses", str(RESPONSES), "--prompts", "benchmarks/data/prompts.jsonl"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^numeracy\s+97\s+100\s+97\.0%\s+99\.0%$", out, re.MULTILINE)
    assert re.search(r"^overall\s+396\s+400\s+99\.0%", out, re.MULTILINE)
    assert "boxes inside the canvas before repair" in out


def test_every_benchmark_prompt_parses_to_the_task_of_the_file():
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    for row in rows:
        assert parse_benchmark_prompt(row["prompt"]) == parse_benchmark_prompt(row["prompt"], row["task"])
        assert parse_benchmark_prompt(row["prompt"]).task == row["task"]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("A realistic photo of a scene without backpacks", dict(task="negation", objects=["backpack"])),
        ("A realistic photo of a scene with three cars", dict(task="numeracy", objects=["car"], count=3)),
        ("A realistic photo of a scene with one laptop", dict(task="numeracy", objects=["laptop"], count=1)),
        (
            "A realistic photo of a scene with an orange dog and a black bowl",
            dict(task="attribution", objects=["dog", "bowl"], colours=["orange", "black"]),
        ),
        (
            "A realistic photo of a scene with a cup on the bottom and a cat on the top",
            dict(task="spatial", objects=["cup", "cat"], relation="bottom"),
        ),
    ],
)
def test_prompt_specs(prompt, expected):
    spec = parse_benchmark_prompt(prompt)
    assert spec.model_dump(include=set(expected)) == expected


def test_a_prompt_outside_the_benchmark_is_refused():
    with pytest.raises(BenchmarkPromptError, match="not a benchmark prompt"):
        parse_benchmark_prompt("a cat sleeping")


def test_matching_handles_plurals_colours_and_word_boundaries():
    assert names_object("a red backpack", "backpack") and names_object("two backpacks", "backpack")
    assert names_object("a dog with a red collar", "dog") and not names_object("a dog with a red collar", "collar")
    assert not names_object("a carrot", "car") and not names_object("a scattered pile of leaves", "cat")
    assert names_object("a dog sleeping on a rug", "dog") and names_object("a running dog", "dog")
    assert names_object("a reading lamp", "lamp") and names_object("a tall building on a hill", "building")
    assert names_object("Puppies", "puppy") and names_object("boxes", "box") and names_object("glasses", "glass")
    assert attribution_rule([("a dark red backpack", (0, 0, 0.5, 0.5)), ("a blue cup", (0.5, 0.5, 1, 1))], [("red", "backpack"), ("blue", "cup")]).passed
    assert not attribution_rule([("a backpack with red straps", (0, 0, 0.5, 0.5))], [("red", "backpack")]).passed


def test_a_box_counts_as_one_object_whatever_its_phrase_says():
    detections = [("two chairs", (0.1, 0.1, 0.6, 0.6)), ("a chair", (0.6, 0.6, 0.9, 0.9))]
    assert count_objects(detections, "chair") == 2
    assert not numeracy_rule(detections, "chair", 3).passed and numeracy_rule(detections, "chair", 2).passed
    assert negation_rule([("a cup", (0, 0, 1, 0.5))], "chair").passed


def test_spatial_uses_the_centres_of_the_first_boxes():
    left, right = (0.0, 0.0, 0.3, 1.0), (0.5, 0.0, 0.8, 1.0)
    assert spatial_rule([("a cat", left), ("a dog", right)], "cat", "dog", "left").passed
    assert not spatial_rule([("a cat", left), ("a dog", right)], "cat", "dog", "right").passed
    assert spatial_rule([("a cat", right), ("a dog", left), ("a cat", (0, 0, 0.1, 0.1))], "cat", "dog", "right").passed
    top, bottom = (0.0, 0.0, 1.0, 0.4), (0.0, 0.5, 1.0, 0.9)
    assert spatial_rule([("a cup", top), ("a dog", bottom)], "cup", "dog", "top").passed
    assert not spatial_rule([("a cup", top), ("a dog", top)], "cup", "dog", "top").passed  # equal centres
    assert spatial_rule([("a cup", top)], "cup", "dog", "top").detail == "no box names 'dog'"


def test_the_rules_take_detector_output_too():
    spec = parse_benchmark_prompt("A realistic photo of a scene with a backpack on the right and a cup on the left")
    detections = [("a photo of a cup", (0.05, 0.4, 0.3, 0.7)), ("backpack", (0.6, 0.3, 0.9, 0.8))]
    assert not evaluate(spec, detections).passed  # "a photo of a cup" names a photo
    assert evaluate(spec, [("cup", detections[0][1]), detections[1]]).passed


def test_scoring_layouts_written_by_batch_mode(capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"index": 0, "task": "numeracy", "prompt": "A realistic photo of a scene with two cats"},
        {"index": 1, "task": "negation", "prompt": "A realistic photo of a scene without dogs"},
        {"index": 2, "task": "spatial", "prompt": "A realistic photo of a scene with a cat on the left and a dog on the right"},
        {"index": 3, "task": "attribution", "prompt": "A realistic photo of a scene with a red cup and a blue book"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def obj(i, phrase, box):
        return {"id": f"o{i}", "phrase": phrase, "box": box}

    layouts = tmp_path / "layouts.jsonl"
    lines = [
        {"index": 0, "prompt": rows[0]["prompt"], "layout": {"objects": [obj(0, "a cat", [0, 0, 0.4, 0.4]), obj(1, "a cat", [0.5, 0.5, 0.9, 0.9])], "warnings": []}},
        {"index": 1, "prompt": rows[1]["prompt"], "layout": {"objects": [obj(0, "a dog", [0, 0, 0.4, 0.4])], "warnings": []}},
        {"index": 2, "prompt": rows[2]["prompt"], "error": "the LLM gave no usable layout", "error_type": "LLMBadOutput"},
    ]
    layouts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["eval-layouts", "--layouts", str(layouts), "--prompts", str(prompts), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["published"]["overall"] == {"passed": 1, "total": 3, "accuracy": 33.3}
    assert report["published"]["numeracy"]["passed"] == 1 and report["published"]["negation"]["passed"] == 0
    assert report["missing"] == 1 and report["parse_or_plan_errors"] == 1


def test_eval_errors_are_one_line(capsys, tmp_path):
    assert main(["eval-layouts", "--responses", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.strip().startswith("lmd eval-layouts: error: cannot read")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a cat sleeping"}\n')
    assert main(["eval-layouts", "--responses", str(RESPONSES), "--prompts", str(bad)]) == 2
    assert "not a benchmark prompt" in capsys.readouterr().err


def test_layouts_of_other_prompts_are_refused_not_scored_by_position(capsys, tmp_path):
    """Layouts planned for other prompts, same indices and count, once scored 100%: now refused in one line."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"index": 0, "task": "numeracy", "prompt": "A realistic photo of a scene with two cats"},
            {"index": 1, "task": "numeracy", "prompt": "A realistic photo of a scene with one dog"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cats = {"objects": [{"id": "c0", "phrase": "a cat", "box": [0, 0, 0.4, 0.4]}, {"id": "c1", "phrase": "a cat", "box": [0.5, 0.5, 0.9, 0.9]}]}
    dog = {"objects": [{"id": "d0", "phrase": "a dog", "box": [0, 0, 0.4, 0.4]}]}
    layouts = tmp_path / "layouts.jsonl"
    other = [{"index": 0, "prompt": "A realistic photo of a scene with three birds", "layout": cats},
             {"index": 1, "prompt": "A realistic photo of a scene with a red car", "layout": dog}]
    layouts.write_text("".join(json.dumps(line) + "\n" for line in other))
    assert main(["eval-layouts", "--layouts", str(layouts), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lmd eval-layouts: error: {layouts}: 2 of 2 layouts are for prompts that are not in")
    assert "three birds" in err

    mine = [{"index": 1, "prompt": rows[0]["prompt"], "layout": cats}, {"index": 0, "prompt": rows[1]["prompt"], "layout": dog}]
    layouts.write_text("".join(json.dumps(line) + "\n" for line in mine))  # the right prompts in another order
    assert main(["eval-layouts", "--layouts", str(layouts), "--prompts", str(prompts), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["published"]["overall"]["passed"] == 2
