"""Stage 1: an LLM turns a prompt into a layout (docs/method.md §0-§1).

The layout (layout.py: the typed layout, its warnings, the box helpers and the object cap)
is the contract between the stages; importing it never imports the LLM client. The rest,
in the order a prompt meets it: the prompt template (template.py), the LLM client with
bounded retries and timeouts (client.py), reading the answer (read.py, with lenient.py for
text that is not quite JSON), repairing it into a valid layout (repair.py, with ids.py for
the ids across turns; parse.py joins the two), the planner that plans and revises over a
cache (planner.py, cache.py), and beside it drawing a layout (draw.py), the layout-level
benchmark rules (benchmark.py), word helpers (words.py, language.py) and the errors
(errors.py).

Names are imported on first use, so ``from layout_planner import Layout`` does not load
``openai``; only the client, the planner and what needs them do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DEFAULT_BACKGROUND": "layout_planner.layout",
    "GRID": "layout_planner.layout",
    "MAX_OBJECTS": "layout_planner.layout",
    "Layout": "layout_planner.layout",
    "LayoutObject": "layout_planner.layout",
    "next_object_id": "layout_planner.layout",
    "xywh_to_xyxy": "layout_planner.layout",
    "xyxy_to_xywh": "layout_planner.layout",
    "InvalidPrompt": "layout_planner.errors",
    "LayoutParseError": "layout_planner.errors",
    "LLMBadOutput": "layout_planner.errors",
    "LLMUnavailable": "layout_planner.errors",
    "PlannerError": "layout_planner.errors",
    "PlanCanceled": "layout_planner.errors",
    "InMemoryCache": "layout_planner.cache",
    "LayoutCache": "layout_planner.cache",
    "cache_key": "layout_planner.cache",
    "build_layout": "layout_planner.repair",
    "parse_answer": "layout_planner.read",
    "parse_layout_text": "layout_planner.parse",
    "TEMPLATE_VERSION": "layout_planner.template",
    "LLMConfig": "layout_planner.client",
    "Planner": "layout_planner.planner",
    "PlanReport": "layout_planner.planner",
    "Turn": "layout_planner.planner",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from layout_planner.cache import InMemoryCache, LayoutCache, cache_key
    from layout_planner.client import LLMConfig
    from layout_planner.errors import InvalidPrompt, LayoutParseError, LLMBadOutput, LLMUnavailable, PlanCanceled, PlannerError
    from layout_planner.layout import DEFAULT_BACKGROUND, GRID, MAX_OBJECTS, Layout, LayoutObject, next_object_id, xywh_to_xyxy, xyxy_to_xywh
    from layout_planner.parse import parse_layout_text
    from layout_planner.read import parse_answer
    from layout_planner.repair import build_layout
    from layout_planner.planner import Planner, PlanReport, Turn
    from layout_planner.template import TEMPLATE_VERSION


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'layout_planner' has no attribute {name!r}")
