"""The layout, its box helpers and the object cap import without the LLM client."""

from __future__ import annotations

from tests.support.blocked_imports import assert_runs_blocking, run_blocking


def test_the_layout_imports_without_openai():
    assert_runs_blocking({"openai"}, (
        "from layout_planner.layout import MAX_OBJECTS, Layout, xywh_to_xyxy\n"
        "from layout_planner import Layout as Exported, MAX_OBJECTS as cap, LayoutParseError, parse_layout_text\n"
        "import layout_planner.draw\n"
        "assert Exported is Layout and cap == MAX_OBJECTS == 30\n"
        "assert xywh_to_xyxy([0, 0, 256, 512]) == (0.0, 0.0, 0.5, 1.0)\n"
    ))


def test_the_planner_still_needs_openai():
    result = run_blocking({"openai"}, "from layout_planner import Planner")
    assert result.returncode != 0 and "openai is blocked" in result.stderr
