"""An LLM answer to a layout: read it (read.py), then repair it (repair.py) (docs/method.md §1.3, §1.4).

The two steps stay apart so that the benchmark can score answers exactly as the LLM gave
them (``parse_answer`` alone) and the planner can re-ask with the reading's error.
"""

from __future__ import annotations

from layout_planner.layout import MAX_OBJECTS, Layout
from layout_planner.read import parse_answer
from layout_planner.repair import build_layout


def parse_layout_text(text: str, previous: Layout | None = None, max_objects: int = MAX_OBJECTS) -> Layout:
    """Read and repair an LLM answer into a ``Layout``; raise ``LayoutParseError`` on garbage."""
    return build_layout(parse_answer(text), previous=previous, max_objects=max_objects)
