"""Stage 1: an LLM turns a prompt into a layout (METHOD.md §1)."""

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

__all__ = [
    "DEFAULT_BACKGROUND",
    "GRID",
    "MAX_OBJECTS",
    "Layout",
    "LayoutObject",
    "next_object_id",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
