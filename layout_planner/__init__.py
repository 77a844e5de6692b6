"""Stage 1: an LLM turns a prompt into a layout (METHOD.md §1)."""

from layout_planner.cache import InMemoryCache, LayoutCache, cache_key
from layout_planner.client import LLMConfig
from layout_planner.errors import InvalidPrompt, LayoutParseError, LLMBadOutput, LLMUnavailable, PlanCanceled, PlannerError
from layout_planner.layout import (
    DEFAULT_BACKGROUND,
    GRID,
    MAX_OBJECTS,
    Layout,
    LayoutObject,
    next_object_id,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from layout_planner.parse import build_layout, parse_answer, parse_layout_text
from layout_planner.planner import Planner, PlanReport, Turn
from layout_planner.template import TEMPLATE_VERSION

__all__ = [
    "DEFAULT_BACKGROUND",
    "GRID",
    "MAX_OBJECTS",
    "TEMPLATE_VERSION",
    "InMemoryCache",
    "InvalidPrompt",
    "LLMBadOutput",
    "LLMConfig",
    "LLMUnavailable",
    "Layout",
    "LayoutCache",
    "LayoutObject",
    "LayoutParseError",
    "PlanCanceled",
    "PlanReport",
    "Planner",
    "PlannerError",
    "Turn",
    "build_layout",
    "cache_key",
    "next_object_id",
    "parse_answer",
    "parse_layout_text",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
