"""Multi-turn revision: untouched objects keep their ids and their exact boxes (docs/method.md §1.7, §2.7)."""

import json

import pytest

from layout_planner import InvalidPrompt, Layout, LayoutObject, Planner, Turn, xywh_to_xyxy

# Boxes off the 512 grid on purpose (as a user-drawn or API-given layout may be): re-rounding would move them.
FIRST = Layout(
    objects=[
        LayoutObject(id="sofa", phrase="a grey sofa", box=(0.0412, 0.4901, 0.5833, 0.8610)),
        LayoutObject(id="lamp", phrase="a floor lamp", box=(0.7231, 0.1777, 0.8999, 0.8571)),
        LayoutObject(id="cat", phrase="a cat", box=(0.3003, 0.6007, 0.4507, 0.8003)),
    ],
    background="a living room",
)


def _answer(objects, background="a living room", negative=""):
    return json.dumps({"objects": objects, "background": background, "negative": negative})


def _as_answer(obj: LayoutObject, **change):
    item = {"id": obj.id, "phrase": obj.phrase, "box": list(obj.box_xywh())}
    item.update(change)
    return item


def test_moving_one_object_keeps_every_other_id_and_exact_box(fake_llm):
    sofa, lamp, cat = FIRST.objects
    fake_llm.enqueue(_answer([_as_answer(sofa), _as_answer(lamp), _as_answer(cat, box=[40, 60, 80, 100])]))
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat in a living room", layout=FIRST)], "move the cat to the top left")
    assert [o.id for o in layout.objects] == ["sofa", "lamp", "cat"]
    assert layout.object("sofa").box == sofa.box and layout.object("lamp").box == lamp.box  # exact, not re-rounded
    assert layout.object("cat").box == xywh_to_xyxy([40, 60, 80, 100])
    assert layout.warnings == []


def test_the_conversation_carries_the_turns_and_the_instruction(fake_llm):
    second = FIRST.model_copy(update={"negative": "dogs"})
    fake_llm.enqueue(second)
    turns = [Turn(text="a cat in a living room", layout=FIRST), Turn(text="no dogs please", layout=second)]
    Planner(fake_llm.config()).revise(turns, "make the lamp taller")
    messages = fake_llm.requests[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "Caption: a cat in a living room"
    assert json.loads(messages[2]["content"])["objects"][0] == {"id": "sofa", "phrase": "a grey sofa", "box": list(FIRST.objects[0].box_xywh())}
    assert messages[3]["content"] == "Instruction: no dogs please"
    assert json.loads(messages[4]["content"])["negative"] == "dogs"
    assert messages[5]["content"] == "Instruction: make the lamp taller"


def test_ids_are_recovered_by_phrase_and_overlap_when_the_llm_drops_them(fake_llm):
    sofa, lamp, cat = FIRST.objects
    # The reference text format carries no ids; the LLM also added a second cat and reordered.
    text = (
        f"[('a cat', [300, 100, 90, 90]), ('a floor lamp', {list(lamp.box_xywh())}), "
        f"('a cat', {list(cat.box_xywh())}), ('a grey sofa', {list(sofa.box_xywh())})]\n"
        "Background prompt: a living room\nNegative prompt: None"
    )
    fake_llm.enqueue(text)
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat in a living room", layout=FIRST)], "add another cat")
    ids = [o.id for o in layout.objects]
    assert ids[:3] == ["sofa", "lamp", "cat"]  # the previous order; the unchanged cat kept its id (best overlap)
    assert ids[3] not in {"sofa", "lamp", "cat"} and layout.objects[3].box == xywh_to_xyxy([300, 100, 90, 90])
    assert layout.object("cat").box == cat.box and layout.object("sofa").box == sofa.box


def test_renamed_ids_and_a_recoloured_object_keep_the_old_ids(fake_llm):
    sofa, lamp, cat = FIRST.objects
    fake_llm.enqueue(
        _answer(
            [
                _as_answer(sofa, id="obj1"),
                _as_answer(lamp, id="obj2"),
                _as_answer(cat, id="obj3", phrase="a black cat"),
            ]
        )
    )
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat in a living room", layout=FIRST)], "make the cat black")
    assert [o.id for o in layout.objects] == ["sofa", "lamp", "cat"]
    assert layout.object("cat").phrase == "a black cat"
    assert layout.object("lamp").box == lamp.box


def test_a_removed_object_disappears_and_its_id_is_not_reused(fake_llm):
    sofa, lamp, _ = FIRST.objects
    fake_llm.enqueue(_answer([_as_answer(sofa), _as_answer(lamp), {"id": "cat", "phrase": "a dog", "box": [10, 10, 60, 60]}]))
    layout = Planner(fake_llm.config(structured_output="off")).revise([Turn(text="a cat", layout=FIRST)], "replace the cat by a small dog in the corner")
    assert layout.object("cat").phrase == "a dog"  # the LLM kept the id: its choice is honoured
    fake_llm.enqueue("[('a grey sofa', [21, 251, 278, 190]), ('a dog', [10, 10, 60, 60])]\nBackground prompt: a living room")
    again = Planner(fake_llm.config()).revise([Turn(text="a cat", layout=FIRST)], "remove the lamp and the cat, add a dog")
    assert [o.id for o in again.objects][0] == "sofa"
    assert again.objects[1].id not in {"lamp", "cat"}


def _reference(objects, background="a living room"):
    items = ", ".join(f"({o.phrase!r}, {list(o.box_xywh())})" for o in objects)
    return f"[{items}]\nBackground prompt: {background}\nNegative prompt: None"


def test_make_it_night_changes_only_the_background(fake_llm):
    sofa, lamp, cat = FIRST.objects
    fake_llm.enqueue(_reference([cat, sofa, lamp], background="a living room at night"))  # no ids, reordered
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat in a living room", layout=FIRST)], "make it night")
    assert layout.objects == FIRST.objects  # same ids, exact boxes, same order
    assert (layout.background, layout.negative, layout.warnings) == ("a living room at night", "", [])
    assert len(fake_llm.requests) == 1


def test_remove_the_dog_removes_exactly_one_object(fake_llm):
    dog = LayoutObject(id="dog", phrase="a small dog", box=(0.6, 0.7, 0.75, 0.95))
    first = FIRST.model_copy(update={"objects": [*FIRST.objects, dog]})
    sofa, lamp, cat, _ = first.objects
    fake_llm.enqueue(_answer([_as_answer(cat, id="obj1"), _as_answer(sofa, id="obj2"), _as_answer(lamp, id="obj3")]))
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat and a dog", layout=first)], "remove the dog")
    assert layout.objects == FIRST.objects  # the removal asked for is said, never silent:
    assert [(w.tag, w.text) for w in layout.warnings] == [("removed", "'a small dog' (dog) is not in the revision")]
    assert len(fake_llm.requests) == 1  # dropping the named object is no partial answer


def test_corners_given_by_mistake_are_recognised_from_the_unchanged_objects(fake_llm):
    sofa, lamp, cat = FIRST.objects

    def corners(obj, box=None):
        x, y, w, h = box or obj.box_xywh()
        return {"phrase": obj.phrase, "box": [x, y, x + w, y + h]}

    fake_llm.enqueue(_answer([corners(sofa), corners(lamp), corners(cat, box=(30, 40, 80, 100))]))
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat in a living room", layout=FIRST)], "move the cat to the top left")
    assert [o.id for o in layout.objects] == ["sofa", "lamp", "cat"]
    assert layout.object("sofa").box == sofa.box and layout.object("lamp").box == lamp.box
    assert layout.object("cat").box == xywh_to_xyxy([30, 40, 80, 100])
    assert [str(w) for w in layout.warnings] == [
        "box: read the boxes as corners [x0, y0, x1, y1]: that way, unlike as [x, y, w, h], they repeat boxes of the previous layout"
    ]


def test_a_partial_answer_is_asked_again_with_the_reason(fake_llm):
    sofa, lamp, cat = FIRST.objects
    fake_llm.enqueue(_answer([_as_answer(cat, box=[40, 60, 80, 100])]))  # only the changed object
    fake_llm.enqueue(_answer([_as_answer(sofa), _as_answer(lamp), _as_answer(cat, box=[40, 60, 80, 100])]))
    layout, report = Planner(fake_llm.config()).revise_with_report([Turn(text="a cat", layout=FIRST)], "move the cat to the top left")
    assert [o.id for o in layout.objects] == ["sofa", "lamp", "cat"] and layout.warnings == []
    assert report.asks == 2
    reask = fake_llm.requests[1].last_user_content
    assert reask.startswith("Your answer left out 'sofa' (a grey sofa), 'lamp' (a floor lamp)")
    assert "whole updated layout" in reask


def test_a_partial_answer_given_twice_keeps_the_left_out_objects(fake_llm):
    sofa, lamp, cat = FIRST.objects
    for _ in range(2):  # "make it night" answered with no objects at all, twice
        fake_llm.enqueue(_answer([], background="a living room at night"))
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat", layout=FIRST)], "make it night")
    assert layout.objects == FIRST.objects and layout.background == "a living room at night"
    assert [w.tag for w in layout.warnings] == ["kept", "kept", "kept"]
    assert "'a grey sofa' (sofa) unchanged" in layout.warnings[0].text
    assert len(fake_llm.requests) == 2  # one re-ask for a partial answer, not max_reasks


def test_an_instruction_about_the_whole_scene_may_drop_unnamed_objects(fake_llm):
    _, _, cat = FIRST.objects
    fake_llm.enqueue(_answer([_as_answer(cat)]))
    layout = Planner(fake_llm.config()).revise([Turn(text="a cat", layout=FIRST)], "remove everything except the cat")
    assert [o.id for o in layout.objects] == ["cat"] and len(fake_llm.requests) == 1


def test_revision_input_is_validated(fake_llm):
    planner = Planner(fake_llm.config())
    with pytest.raises(InvalidPrompt, match="needs the conversation so far"):
        planner.revise([], "move the cat")
    with pytest.raises(InvalidPrompt, match="the instruction is empty"):
        planner.revise([Turn(text="a cat", layout=FIRST)], "  ")
    with pytest.raises(InvalidPrompt, match="the instruction contains the control character"):
        planner.revise([Turn(text="a cat", layout=FIRST)], "move\x07 it")
    assert fake_llm.requests == []
