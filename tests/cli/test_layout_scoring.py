"""lmd.evaluation.layouts on a few prompts: keys, failures, the repaired score and the report."""

from __future__ import annotations

import pytest

from lmd.evaluation.layouts import LayoutEvalError, format_report, layout_key, score_layouts, score_responses, tally
from tests.support.builders import box_object, layout_data

PROMPTS = [
    {"index": 0, "task": "numeracy", "prompt": "A realistic photo of a scene with two cats"},
    {"index": 1, "task": "numeracy", "prompt": "A realistic photo of a scene with one dog"},
]
TWO_CATS = layout_data(box_object("cat0", "a cat", [0.05, 0.3, 0.45, 0.7]), box_object("cat1", "a cat", [0.55, 0.3, 0.95, 0.7]))
THRESHOLDS = {"prompts_label": "prompts.jsonl", "max_iou": 0.5, "min_box_px": 32}


def test_a_layout_is_keyed_by_its_index_else_its_text_and_occurrence():
    assert layout_key({"index": 7, "prompt": "p"}, 3) == "index:7"
    assert layout_key({"prompt": "p"}, 3) == "prompt:p#3"


def test_planned_layouts_pass_fail_and_count_what_is_missing():
    lines = [{"prompt": PROMPTS[0]["prompt"], "layout": TWO_CATS}, {"prompt": PROMPTS[1]["prompt"], "error": "LLM down"}]
    report = score_layouts(PROMPTS, lines, layouts_label="layouts.jsonl", **THRESHOLDS).report("layouts.jsonl")
    assert report["published"]["overall"] == {"passed": 1, "total": 2, "accuracy": 50.0}
    assert report["parse_or_plan_errors"] == 1 and report["missing"] == 0
    assert report["failures"] == [{"index": 1, "task": "numeracy", "prompt": PROMPTS[1]["prompt"],
                                   "reason": "planning failed: LLM down"}]
    assert report["strict"]["all"] == {"passed": 1, "total": 1, "rate": 100.0}
    assert score_layouts(PROMPTS, [], layouts_label="l", **THRESHOLDS).missing == 2


def test_an_answer_that_does_not_parse_fails_its_prompt():
    scores = score_responses(PROMPTS[:1], {PROMPTS[0]["prompt"]: ["no layout here"]}, **THRESHOLDS)
    assert scores.errors == 1 and scores.published == [("numeracy", False)] == scores.repaired
    assert scores.failures[0]["reason"].startswith("parse error:")


def test_nothing_to_score_and_a_bad_stored_layout_are_errors():
    with pytest.raises(LayoutEvalError, match="nothing to score"):
        score_layouts(PROMPTS, [], layouts_label="l", **THRESHOLDS).report("l")
    bad = [{"prompt": PROMPTS[0]["prompt"], "layout": {"objects": [box_object(box=[0.5, 0.5, 0.2, 0.9])]}}]
    with pytest.raises(LayoutEvalError, match=r"^layouts.jsonl: the layout of 'A realistic photo of a scene with two cats' \(sample 0\) is invalid"):
        score_layouts(PROMPTS, bad, layouts_label="layouts.jsonl", **THRESHOLDS)


def test_tasks_are_tallied_in_the_benchmark_order_and_the_report_prints():
    assert list(tally([("spatial", True), ("negation", False)])) == ["negation", "spatial", "overall"]
    report = score_layouts(PROMPTS, [{"prompt": PROMPTS[0]["prompt"], "layout": TWO_CATS}], layouts_label="l", **THRESHOLDS).report("l")
    text = format_report(report, show_failures=False)
    assert text.splitlines()[0] == "LMD layout-level accuracy of l (published rules)"
    assert "prompts without a layout or response: 1" in text


def test_layouts_are_matched_by_prompt_text_and_other_prompts_are_refused():
    """A file planned for other prompts (same indices, same count) is refused, not scored by position."""
    swapped = [{"index": 0, "prompt": PROMPTS[1]["prompt"], "layout": TWO_CATS},
               {"index": 1, "prompt": PROMPTS[0]["prompt"], "layout": TWO_CATS}]
    report = score_layouts(PROMPTS, swapped, layouts_label="l", **THRESHOLDS).report("l")
    assert report["published"]["overall"]["passed"] == 1  # two cats pass "two cats" only, wherever the line is
    other = [{"index": 0, "prompt": "A realistic photo of a scene with two cats and a dog", "layout": TWO_CATS},
             {"index": 1, "prompt": PROMPTS[1]["prompt"], "layout": TWO_CATS}]
    with pytest.raises(LayoutEvalError, match=r"^l: 1 of 2 layouts are for prompts that are not in prompts.jsonl "
                                              r"\(first: 'A realistic photo of a scene with two cats and a dog'\)"):
        score_layouts(PROMPTS, other, layouts_label="l", **THRESHOLDS)
    with pytest.raises(LayoutEvalError, match=r"line 1 has no \"prompt\" string"):
        score_layouts(PROMPTS, [{"index": 0, "layout": TWO_CATS}], layouts_label="l", **THRESHOLDS)
