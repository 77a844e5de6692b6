"""Image-level scoring of the LMD benchmark: synthetic detections through the published rules,
Wilson intervals, the table, the prompt subset of quick runs, recorded responses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layout_planner.benchmark import evaluate, parse_benchmark_prompt
from lmd.evaluation.detection import Detection, DetectorConfig, query_text, select_detections
from lmd.evaluation.prompts import (
    DEFAULT_PROMPTS,
    BenchmarkDataError,
    BenchmarkPrompt,
    load_prompts,
    load_responses,
    occurrence_numbers,
    select_prompts,
)
from lmd.evaluation.runner import detector_queries
from lmd.evaluation.scoring import accuracy, markdown_table, summarise, wilson_interval

RESPONSES = Path(__file__).parents[1] / "data" / "llm_responses_gpt-3.5-turbo.json"
LEFT, RIGHT = (0.05, 0.3, 0.35, 0.7), (0.6, 0.3, 0.95, 0.7)
TOP, BOTTOM = (0.3, 0.05, 0.7, 0.35), (0.3, 0.6, 0.7, 0.95)


def _score(prompt: str, task: str, detections: list[tuple[str, tuple, float]]) -> bool:
    """Detections named like the harness names them (its queries), highest score first, through the rule."""
    spec = parse_benchmark_prompt(prompt, task)
    queries = detector_queries(spec)
    found = sorted((Detection(name=n, box=b, score=s) for n, b, s in detections), key=lambda d: -d.score)
    assert all(d.name in queries for d in found), f"synthetic names {[d.name for d in found]} must be queries {queries}"
    return evaluate(spec, [d.as_rule_input() for d in found]).passed


def test_queries_follow_the_published_protocol():
    assert detector_queries(parse_benchmark_prompt("A realistic photo of a scene without backpacks", "negation")) == ["backpack"]
    assert detector_queries(parse_benchmark_prompt("A realistic photo of a scene with three cups", "numeracy")) == ["cup"]
    attribution = parse_benchmark_prompt("A realistic photo of a scene with a red backpack and a blue car", "attribution")
    assert detector_queries(attribution) == ["red backpack", "blue car"]
    spatial = parse_benchmark_prompt("A realistic photo of a scene with a dog on the left and a cat on the right", "spatial")
    assert detector_queries(spatial) == ["dog", "cat"]


def test_query_texts_use_the_right_article():
    assert query_text("red backpack") == "a photo of a red backpack"
    assert query_text("orange cup") == "a photo of an orange cup"  # published: inflect's "an orange"
    assert query_text("dog") == "a photo of a dog"


def test_selection_keeps_scores_at_the_threshold_and_suppresses_per_query():
    import torch

    names = ["cup", "red cup"]
    boxes = torch.tensor([
        [0.10, 0.10, 0.50, 0.50],  # cup, best
        [0.12, 0.10, 0.52, 0.50],  # cup, overlaps the best (IoU ~0.9): suppressed
        [0.10, 0.10, 0.50, 0.50],  # red cup on the same spot: another query, kept
        [0.46, 0.10, 0.86, 0.50],  # cup, IoU ~0.05 with the best: kept
        [0.60, 0.60, 0.90, 0.90],  # cup below the threshold: dropped
        [-0.05, 0.55, 0.35, 1.02],  # cup reaching outside the image, exactly at the threshold: kept, not clipped
        [0.70, 0.05, 0.70, 0.30],  # a red cup with no width: dropped
    ])  # fmt: skip
    scores = torch.tensor([0.60, 0.55, 0.30, 0.20, 0.149, 0.15, 0.9])
    labels = torch.tensor([0, 0, 1, 0, 0, 0, 1])
    found = select_detections(scores, labels, boxes, names, DetectorConfig(score_threshold=0.15, nms_iou=0.15), (512, 512))
    assert [(d.name, d.score) for d in found] == [("cup", 0.6), ("red cup", 0.3), ("cup", 0.2), ("cup", 0.15)]
    assert found[-1].box == (-0.05, 0.55, 0.35, 1.02)
    # the same boxes with a looser NMS keep the overlapping cup too
    loose = select_detections(scores, labels, boxes, names, DetectorConfig(score_threshold=0.15, nms_iou=0.95), (512, 512))
    assert [d.score for d in loose] == [0.6, 0.55, 0.3, 0.2, 0.15]


def test_negation_rule_on_detections():
    prompt = "A realistic photo of a scene without backpacks"
    assert _score(prompt, "negation", [])
    assert not _score(prompt, "negation", [("backpack", LEFT, 0.3)])


def test_numeracy_rule_on_detections():
    prompt = "A realistic photo of a scene with three cups"
    three = [("cup", LEFT, 0.5), ("cup", RIGHT, 0.4), ("cup", TOP, 0.2)]
    assert _score(prompt, "numeracy", three)
    assert not _score(prompt, "numeracy", three[:2])
    assert not _score(prompt, "numeracy", [*three, ("cup", BOTTOM, 0.16)])


def test_attribution_rule_on_detections():
    prompt = "A realistic photo of a scene with a red backpack and a blue car"
    assert _score(prompt, "attribution", [("red backpack", LEFT, 0.4), ("blue car", RIGHT, 0.3)])
    assert not _score(prompt, "attribution", [("red backpack", LEFT, 0.4)])
    assert not _score(prompt, "attribution", [])


@pytest.mark.parametrize(
    "prompt, first, second",
    [
        ("A realistic photo of a scene with a dog on the left and a cat on the right", LEFT, RIGHT),
        ("A realistic photo of a scene with a dog on the right and a cat on the left", RIGHT, LEFT),
        ("A realistic photo of a scene with a dog on the top and a cat on the bottom", TOP, BOTTOM),
        ("A realistic photo of a scene with a dog on the bottom and a cat on the top", BOTTOM, TOP),
    ],
)
def test_spatial_rule_on_detections(prompt, first, second):
    assert _score(prompt, "spatial", [("dog", first, 0.5), ("cat", second, 0.5)])
    assert not _score(prompt, "spatial", [("dog", second, 0.5), ("cat", first, 0.5)])
    assert not _score(prompt, "spatial", [("dog", first, 0.5)])
    # the rule reads each object's FIRST box: the harness orders detections by score
    assert not _score(prompt, "spatial", [("dog", second, 0.9), ("dog", first, 0.2), ("cat", second, 0.5)])


def test_wilson_interval_known_values():
    # reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson"))
    assert wilson_interval(80, 100) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_summary_and_table():
    outcomes = [("negation", True)] * 3 + [("numeracy", True), ("numeracy", False), ("spatial", False)]
    summary = summarise(outcomes)
    assert summary["negation"].accuracy == 1.0 and summary["negation"].total == 3
    assert summary["numeracy"].accuracy == 0.5
    assert summary["attribution"].total == 0 and summary["attribution"].accuracy is None
    assert summary["overall"].passed == 4 and summary["overall"].total == 6
    assert accuracy([]).ci95 is None
    table = markdown_table({"lmd (test)": summary})
    header, rule, row = table.strip().splitlines()
    assert header == "| method | negation | numeracy | attribution | spatial | overall | prompts |"
    assert row.startswith("| lmd (test) | 100.0 [44, 100] | 50.0 [9, 91] | - | 0.0 [0, 79] | 66.7 [30, 90] | 6 |")


def test_benchmark_prompts_file():
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert len(prompts) == 400
    assert {p.task for p in prompts} == {"negation", "numeracy", "attribution", "spatial"}
    for prompt in prompts:  # every prompt has a spec the rules understand
        assert detector_queries(parse_benchmark_prompt(prompt.prompt, prompt.task))


def test_limit_spreads_over_tasks_and_within_them():
    prompts = load_prompts(DEFAULT_PROMPTS)
    four = select_prompts(prompts, 4)
    assert [p.task for p in four] == ["negation", "numeracy", "attribution", "spatial"]
    eight = select_prompts(prompts, 8)
    negation = [p for p in eight if p.task == "negation"]
    assert len(eight) == 8 and len(negation) == 2
    assert negation[0].prompt != negation[1].prompt, "a small run should not repeat the same negation prompt"
    six = select_prompts(prompts, 6)
    assert [sum(p.task == t for p in six) for t in ("negation", "numeracy", "attribution", "spatial")] == [2, 2, 1, 1]
    assert select_prompts(prompts, None) == prompts
    assert select_prompts(prompts, 1000) == prompts
    with pytest.raises(BenchmarkDataError):
        select_prompts(prompts, 0)


def test_recorded_responses_follow_occurrences():
    prompts = load_prompts(DEFAULT_PROMPTS)
    responses = load_responses(RESPONSES, prompts)
    book = json.loads(RESPONSES.read_text())
    assert len(responses) == 400
    occurrences = occurrence_numbers(prompts)
    for prompt in prompts:
        assert responses[prompt.index] == book[prompt.prompt][occurrences[prompt.index]]
    numeracy = [p for p in prompts if p.task == "numeracy"]
    twice = [p for p in numeracy if p.prompt == numeracy[0].prompt]
    assert [occurrences[p.index] for p in twice] == [0, 1]


def test_bad_data_files_name_the_problem(tmp_path: Path):
    with pytest.raises(BenchmarkDataError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"index": 0, "task": "colour", "prompt": "x"}\n')
    with pytest.raises(BenchmarkDataError, match="prompts.jsonl:1"):
        load_prompts(bad)
    prompts = [BenchmarkPrompt(index=0, task="negation", prompt="A realistic photo of a scene without cats")] * 1
    short = tmp_path / "responses.json"
    short.write_text(json.dumps({"A realistic photo of a scene without cats": []}))
    with pytest.raises(BenchmarkDataError, match="occurrence 1"):
        load_responses(short, prompts)
    short.write_text("[1, 2]")
    with pytest.raises(BenchmarkDataError, match="must map each prompt"):
        load_responses(short, prompts)


def test_detections_keep_the_precision_the_spatial_rule_compares():
    import torch

    boxes = torch.tensor([[0.20000, 0.1, 0.40000, 0.5], [0.20003, 0.1, 0.40003, 0.5]])  # 0.015 px apart at 512 px
    found = select_detections(torch.tensor([0.5, 0.4]), torch.tensor([0, 1]), boxes, ["dog", "cat"], DetectorConfig(), (512, 512))
    spec = parse_benchmark_prompt("A realistic photo of a scene with a dog on the left and a cat on the right", "spatial")
    assert evaluate(spec, [d.as_rule_input() for d in found]).passed
