"""Warnings are bounded like every stored field: an LLM answer with thousands of broken objects stays small."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from layout_planner import Layout, build_layout, parse_answer
from layout_planner.layout import MAX_WARNING_CHARS, MAX_WARNINGS


def test_an_answer_with_thousands_of_repairs_keeps_at_most_the_bounded_warnings():
    objects = [{"id": f"o{i}", "phrase": f"a ball number {i}", "box": [0, 0, 0, 0]} for i in range(5000)]
    objects.append({"id": "cat", "phrase": "a cat", "box": [10, 10, 100, 100]})
    layout = build_layout(parse_answer(json.dumps({"objects": objects, "background": "a room"})))
    assert [o.id for o in layout.objects] == ["cat"]
    assert len(layout.warnings) == MAX_WARNINGS
    assert layout.warnings[-1].text.startswith("... and ") and all(len(w.text) <= MAX_WARNING_CHARS for w in layout.warnings)
    assert len(layout.model_dump_json()) < 20_000


def test_a_given_layout_with_too_many_or_too_long_warnings_is_refused():
    cat = {"id": "cat", "phrase": "a cat", "box": [0.1, 0.1, 0.5, 0.5]}
    with pytest.raises(ValidationError):
        Layout.model_validate({"objects": [cat], "warnings": ["dropped: w"] * (MAX_WARNINGS + 1)})
    with pytest.raises(ValidationError):
        Layout.model_validate({"objects": [cat], "warnings": ["dropped: " + "w" * (MAX_WARNING_CHARS + 1)]})
