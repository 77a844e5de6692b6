"""Object ids across turns (docs/method.md §1.7): an object that stays keeps its id.

:func:`assign_ids` gives each repaired object, in order of evidence: the id the answer gave
when it names an object of the previous turn; the previous id of the same phrase with the
best box overlap; the previous id of a strongly overlapping box (a changed phrase in the same
place); the answer's own new id when free and well formed; else a fresh id from the phrase.
"""

from __future__ import annotations

from typing import NamedTuple

from layout_planner.layout import ID_PATTERN, Box, Layout, LayoutObject, LayoutWarning, box_iou, next_object_id, xyxy_to_xywh

SAME_PLACE_IOU = 0.5
"""A changed phrase keeps the previous id when its box overlaps the old one at least this much."""


class Pending(NamedTuple):
    """A repaired object waiting for its id: the id the answer gave, the phrase, the xyxy box."""

    given: str | None
    phrase: str
    box: Box


def assign_ids(pending: list[Pending], previous: Layout | None, trust_ids: bool, warnings: list[LayoutWarning]) -> list[LayoutObject]:
    """The layout's objects: ids the answer's own, else the previous turn's by match, else new.

    ``trust_ids``: the answer's format carries ids (JSON); an unusable one is replaced with a warning.
    Objects that stayed keep the previous order (a reordered answer changes nothing); new ones follow.
    """
    prev = {o.id: o for o in previous.objects} if previous else {}
    ids: list[str | None] = [None] * len(pending)
    taken: set[str] = set()
    if trust_ids:
        _keep_given_previous_ids(pending, prev, ids, taken)
    if prev:
        _match(ids, taken, _same_phrase_pairs(pending, prev, ids, taken))
        _match(ids, taken, _same_place_pairs(pending, prev, ids, taken))
    _new_ids(pending, prev, trust_ids, ids, taken, warnings)
    objects = [_object(object_id, item, prev.get(object_id)) for object_id, item in zip(ids, pending)]
    order = {object_id: index for index, object_id in enumerate(prev)}
    return sorted(objects, key=lambda o: order.get(o.id, len(order)))


def _keep_given_previous_ids(pending: list[Pending], prev: dict[str, LayoutObject], ids: list[str | None], taken: set[str]) -> None:
    for i, item in enumerate(pending):
        if item.given in prev and item.given not in taken:
            ids[i] = item.given
            taken.add(item.given)


def _same_phrase_pairs(pending, prev, ids, taken) -> list[tuple[float, int, str]]:
    """(overlap, index, previous id) for the same phrase: the LLM dropped or changed the id; a moved object still matches."""
    return [
        (box_iou(item.box, old.box), i, old.id)
        for i, item in enumerate(pending)
        for old in prev.values()
        if ids[i] is None and old.id not in taken and old.phrase.lower() == item.phrase.lower()
    ]


def _same_place_pairs(pending, prev, ids, taken) -> list[tuple[float, int, str]]:
    """(overlap, index, previous id) for a strong overlap: a changed phrase in the same place ("make the cat black")."""
    pairs = []
    for i, item in enumerate(pending):
        for old in prev.values():
            if ids[i] is None and old.id not in taken:
                iou = box_iou(item.box, old.box)
                if iou >= SAME_PLACE_IOU:
                    pairs.append((iou, i, old.id))
    return pairs


def _match(ids: list[str | None], taken: set[str], pairs: list[tuple[float, int, str]]) -> None:
    """Greedy matching, best overlap first."""
    for _, i, old_id in sorted(pairs, key=lambda p: -p[0]):
        if ids[i] is None and old_id not in taken:
            ids[i] = old_id
            taken.add(old_id)


def _new_ids(pending, prev, trust_ids: bool, ids: list[str | None], taken: set[str], warnings: list[LayoutWarning]) -> None:
    for i, item in enumerate(pending):
        if ids[i] is not None:
            continue
        given = item.given
        if trust_ids and given and ID_PATTERN.match(given) and given not in taken and given not in prev:
            ids[i] = given
        else:
            if trust_ids and given:
                warnings.append(LayoutWarning(tag="id", text=f"replaced id {given!r} of {item.phrase!r} (taken or malformed)"))
            ids[i] = next_object_id(None, item.phrase, taken | set(prev))
        taken.add(ids[i])


def _object(object_id: str, item: Pending, old: LayoutObject | None) -> LayoutObject:
    box = item.box
    if old is not None and old.phrase == item.phrase and xyxy_to_xywh(box) == old.box_xywh():
        box = old.box  # unchanged on the grid: keep the exact box, not its re-rounded copy
    return LayoutObject(id=object_id, phrase=item.phrase, box=box)
