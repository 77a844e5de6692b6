"""The lenient readers (layout_planner/lenient.py), each on the wrapping it exists for."""

from __future__ import annotations

import pytest

from layout_planner.errors import LayoutParseError
from layout_planner.lenient import (
    bracket_spans,
    complete_json_objects,
    fenced_blocks,
    json_string_field,
    load_json_like,
    read_tuples,
    strip_reasoning,
    without_fence_lines,
    without_json_noise,
)


def test_reasoning_is_stripped_even_without_its_opening_tag():
    assert strip_reasoning("<think>boxes first</think>\n{\"objects\": []}") == '{"objects": []}'
    assert strip_reasoning("the cat goes left</think> [('a cat', [0, 0, 9, 9])]") == "[('a cat', [0, 0, 9, 9])]"
    with pytest.raises(LayoutParseError, match="<reasoning> is never closed"):
        strip_reasoning("<reasoning>the answer was cut while thinking")


def test_fences_of_any_language_are_found_and_their_lines_dropped():
    text = "Here:\n```json\n{\"a\": 1}\n```\nand\n```python\n[1]\n```"
    assert fenced_blocks(text) == ['{"a": 1}', "[1]"]
    assert without_fence_lines("```\n[('a cat', [1, 2, 3, 4])]\n```") == "\n[('a cat', [1, 2, 3, 4])]\n"


def test_bracket_spans_skip_quotes_and_report_an_unclosed_span():
    text = "Here's the plan: {\"p\": \"a } brace\", 'q': ['x']} then [1, 2"
    spans = bracket_spans(text)
    assert [text[s:e] for s, e in spans if e > 0] == ["{\"p\": \"a } brace\", 'q': ['x']}"]
    assert spans[-1] == (text.index("[1"), -1)
    assert bracket_spans("(1) [2]", openers="{") == []  # only the given openers start a span


def test_json_noise_goes_but_strings_keep_what_looks_like_it():
    noisy = '{"a": [1, 2,], // two\n "b": "x // not a comment", /* block */ "c": {"d": 1,},}'
    assert without_json_noise(noisy) == '{"a": [1, 2], \n "b": "x // not a comment",  "c": {"d": 1}}'
    assert load_json_like(noisy) == {"a": [1, 2], "b": "x // not a comment", "c": {"d": 1}}
    assert load_json_like("{'a': ('b', 1)}") == {"a": ("b", 1)}  # a Python literal
    with pytest.raises(ValueError, match="invalid JSON"):
        load_json_like("{a: 1}")


def test_a_truncated_answer_yields_its_complete_objects_and_fields():
    cut = '{"background": "a \\"sunny\\" park", "objects": [{"phrase": "a cat"}, {"phrase": "a dog"}, {"phr'
    assert complete_json_objects(cut) == [{"phrase": "a cat"}, {"phrase": "a dog"}]
    assert complete_json_objects(cut, "boxes") == []
    assert json_string_field(cut, "background") == 'a "sunny" park'
    assert json_string_field(cut, "negative") is None


def test_tuples_are_read_one_by_one_only_when_nothing_else_is_between():
    listed = "1. ('a child's toy', [10, 20, 30, 40])\n2. (\"a dog\", [1.5, 2, 3, 4e1])"
    assert read_tuples(listed) == [("a child's toy", [10.0, 20.0, 30.0, 40.0]), ("a dog", [1.5, 2.0, 3.0, 40.0])]
    assert read_tuples("('a cat', [1, 2, 3, 4]) and then a word ('a dog', [1, 2, 3, 4])") is None
    cut = "[('a cat', [1, 2, 3, 4]), ('a dog', [5, 6"
    assert read_tuples(cut) is None
    assert read_tuples(cut, partial_tail=True) == [("a cat", [1.0, 2.0, 3.0, 4.0])]
    assert read_tuples("no tuples here") is None
