"""Layout warnings are typed: a tag that code reads, a text that people read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from layout_planner.layout import WARNING_TAGS, Layout, LayoutWarning
from layout_planner.parse import parse_layout_text


def test_a_repair_is_a_tagged_warning_in_the_json():
    layout = parse_layout_text('{"objects": [{"phrase": "a cat", "box": [400, 0, 200, 100]}], "background": "a room"}')
    assert layout.model_dump(mode="json")["warnings"] == [
        {"tag": "clipped", "text": "'a cat' box [400, 0, 200, 100] to the canvas as [400, 0, 112, 100]"}
    ]
    assert str(layout.warnings[0]) == "clipped: 'a cat' box [400, 0, 200, 100] to the canvas as [400, 0, 112, 100]"


def test_the_one_line_form_is_read_back_and_unknown_tags_are_refused():
    layout = Layout.model_validate({"warnings": ["dropped: 'a dog' has an empty box [0, 0, 0, 10]"]})
    assert layout.warnings == [LayoutWarning(tag="dropped", text="'a dog' has an empty box [0, 0, 0, 10]")]
    with pytest.raises(ValidationError):
        LayoutWarning(tag="oops", text="not a tag")
    assert {"dropped", "clipped", "split", "truncated", "kept"} <= set(WARNING_TAGS)
