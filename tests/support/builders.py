"""One place for the layouts, settings and records that tests build over and over.

Layouts are plain dicts (what a request body or a layout file holds); ``layout()`` validates
one into the stages' ``Layout``. Each builder takes the fields a test cares about and fills
the rest, so a test shows only what it is about.
"""

from __future__ import annotations

from typing import Any

from jobs.records import JobRecord, SessionRecord, new_id, utcnow
from layout_planner.layout import Layout
from lmd.settings import Settings


def box_object(id: str = "cat", phrase: str = "a cat", box: list[float] | tuple = (0.1, 0.1, 0.6, 0.6)) -> dict[str, Any]:
    """One object of a layout: an id, a phrase and a normalised ``[x0, y0, x1, y1]`` box."""
    return {"id": id, "phrase": phrase, "box": list(box)}


def layout_data(*objects: dict[str, Any], background: str = "a room", **fields: Any) -> dict[str, Any]:
    """A layout as JSON data; one cat unless ``objects`` are given."""
    return {"objects": list(objects) or [box_object()], "background": background, **fields}


def layout(*objects: dict[str, Any], **fields: Any) -> Layout:
    return Layout.model_validate(layout_data(*objects, **fields))


def plain_settings(**fields: Any) -> Settings:
    """Settings from ``fields`` and the defaults only: no ``.env`` file is read."""
    return Settings(_env_file=None, **fields)


def job_record(**fields: Any) -> JobRecord:
    """A queued job of one cat prompt; ``fields`` override any of its values."""
    now = utcnow()
    values: dict[str, Any] = {"job_id": "j", "session_id": "s", "prompt": "a cat", "seed": 1,
                              "created_at": now, "updated_at": now}
    values.update(fields)
    return JobRecord(**values)


def session_record(**fields: Any) -> SessionRecord:
    now = utcnow()
    values: dict[str, Any] = {"session_id": new_id(), "seed": 1, "created_at": now, "updated_at": now}
    values.update(fields)
    return SessionRecord(**values)


def park_layout_data(*extra: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The controller tests' scene: a red cat and a dog in a realistic park, then ``extra`` objects."""
    cat = box_object("cat", "a red cat", (0.05, 0.1, 0.45, 0.6))
    dog = box_object("dog", "a dog", (0.5, 0.4, 0.95, 0.95))
    return layout_data(cat, dog, *extra, **{"background": "a realistic park", **fields})


def same_phrase_objects(boxes: list, phrase: str = "a cat") -> list[dict[str, Any]]:
    """One object per box, all with ``phrase``, ids ``o0``, ``o1``..."""
    return [box_object(f"o{k}", phrase, box) for k, box in enumerate(boxes)]
