import pytest
from pydantic import ValidationError

from layout_planner import Layout, LayoutObject, next_object_id, xywh_to_xyxy, xyxy_to_xywh


def test_xywh_round_trip_on_the_512_grid():
    xyxy = xywh_to_xyxy([64, 128, 256, 192])
    assert xyxy == (0.125, 0.25, 0.625, 0.625)
    assert xyxy_to_xywh(xyxy) == (64, 128, 256, 192)


@pytest.mark.parametrize(
    "box, message",
    [((0.1, 0.1, 1.2, 0.5), "leaves the canvas"), ((0.3, 0.3, 0.3, 0.6), "zero area"), ((-0.1, 0, 0.5, 0.5), "leaves the canvas")],
)
def test_bad_boxes_are_rejected_with_a_clear_message(box, message):
    with pytest.raises(ValidationError, match=message):
        LayoutObject(id="a", phrase="a cat", box=box)


def test_duplicate_ids_and_empty_background():
    obj = LayoutObject(id="cat", phrase="a cat", box=(0, 0, 0.5, 0.5))
    with pytest.raises(ValidationError, match="appears twice"):
        Layout(objects=[obj, obj])
    assert Layout(objects=[obj], background="  ").background == "a realistic scene"


def test_json_schema_and_reference_text():
    layout = Layout(objects=[LayoutObject(id="cat", phrase="a cat", box=(0.0, 0.5, 0.5, 1.0))], background="a sofa", negative="dogs")
    schema = Layout.model_json_schema()
    assert set(schema["properties"]) == {"objects", "background", "negative", "warnings"}
    assert layout.to_reference_text() == "[('a cat', [0, 256, 256, 256])]\nBackground prompt: a sofa\nNegative prompt: dogs"
    assert next_object_id(layout, "a black cat") == "cat_2"


@pytest.mark.parametrize("bad", [".", "..", "...", ".hidden", "-x", "a/b", "a\\b", "", "x" * 33, "cat dog"])
def test_the_id_alphabet_refuses_ids_that_are_not_plain_file_names(bad):
    from layout_planner.layout import mask_file_name

    with pytest.raises(ValidationError, match="object id"):
        LayoutObject(id=bad, phrase="a cat", box=(0.1, 0.1, 0.5, 0.5))
    with pytest.raises(ValueError):
        mask_file_name(bad)


@pytest.mark.parametrize("good", ["cat", "cat_2", "_x", "0", "a.b-c", "A" * 32, "x..."])
def test_the_id_alphabet_keeps_the_ids_planners_and_users_write(good, tmp_path):
    from layout_planner.layout import mask_file_name

    assert LayoutObject(id=good, phrase="a cat", box=(0.1, 0.1, 0.5, 0.5)).id == good
    path = tmp_path / mask_file_name(good)
    path.write_bytes(b"png")  # a plain file in that directory, whatever the id
    assert path.parent == tmp_path and path.is_file()
