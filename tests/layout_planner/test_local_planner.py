"""The local planner on a tiny random chat LM (built locally): constrained decoding, limits, cancellation.

The weights are random, so whatever the model prefers, only the layout grammar makes its
answers layouts: every check below fails if the grammar is not applied.
"""

import json
import subprocess
import sys

import pytest

from layout_planner import InMemoryCache, Layout, LayoutObject, LLMBadOutput, Planner, Turn
from layout_planner.errors import LocalModelUnavailable, PlanCanceled
from layout_planner.layout import MAX_OBJECTS
from layout_planner.local import LocalLLMConfig
from layout_planner.template import CAPTION_PREFIX, chat_messages

# About half the answers of the random model hold objects (the rest: "objects": []). Which ones depends
# on the weights and the tokenizer the fixture builds, so the first test plans until it has seen
# four layouts and objects in one of them (twelve prompts make a run without objects a 1-in-4000 chance).
PROMPTS = [
    "three cats on a sofa, a red lamp on the left", "a dog", "a realistic photo of an empty street", "two apples",
    "a boat on a lake", "a bird above a tree", "a red car next to a blue bike", "a mug on a desk",
    "two dogs in a park", "a horse in a field", "a cake on a table", "a lighthouse by the sea",
]


@pytest.fixture(scope="module")
def local_planner(tiny_lm_path):
    """One planner (one model load) for the module; sampling at temperature 1 so answers vary."""
    import torch

    torch.set_num_threads(1)
    planner = Planner(
        LocalLLMConfig(model=str(tiny_lm_path), device="cpu", temperature=1.0), cache=InMemoryCache(), max_objects=4
    )
    planner.client.load()
    yield planner
    planner.close()


def _config(planner: Planner, max_objects: int | None = None, **changes) -> Planner:
    """A planner sharing ``planner``'s loaded model and grammar (at most ``planner.max_objects`` objects
    per answer), with other limits."""
    other = Planner(planner.config.model_copy(update=changes), max_objects=max_objects or planner.max_objects)
    other.client = type(planner.client)(other.config, max_objects=planner.max_objects)
    other.client._loaded = planner.client._loaded
    return other


def test_every_answer_of_a_random_model_is_a_valid_layout(local_planner):
    objects = 0
    for number, prompt in enumerate(PROMPTS):
        if number >= 4 and objects:
            break
        layout, report = local_planner.plan_with_report(prompt)
        assert report.asks == 1 and report.parse_errors == [] and report.structured and report.tokens > 0
        assert Layout.model_validate(layout.model_dump()) == layout
        assert layout.background.strip() and isinstance(layout.negative, str)
        assert len(layout.objects) <= 4 and len({o.id for o in layout.objects}) == len(layout.objects)
        for obj in layout.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and obj.phrase[0].isalpha()
        objects += len(layout.objects)
    assert objects > 0


def test_the_raw_answer_is_json_of_the_answer_shape(local_planner):
    messages = chat_messages(local_planner.template, [], CAPTION_PREFIX + "a cat")
    completion = local_planner.client.complete(messages, seed=3)
    answer = json.loads(completion.text)
    assert completion.finish_reason == "stop" and completion.record.tokens > 0
    assert list(answer) == ["objects", "background", "negative"]
    for item in answer["objects"]:
        assert list(item) == ["id", "phrase", "box"] and len(item["box"]) == 4
        assert all(isinstance(v, int) for v in item["box"]) and min(item["box"][2:]) >= 16


def test_answers_are_cached_and_repeat_by_seed(local_planner):
    layout, _ = local_planner.plan_with_report("a red kite")
    again, report = local_planner.plan_with_report("a red kite")
    assert report.cached and report.tokens == 0 and again == layout
    fresh = _config(local_planner)  # no cache: the same key gives the same seed, so the same answer
    assert fresh.plan("a red kite") == layout


def test_a_revision_keeps_the_ids_of_untouched_objects(local_planner):
    previous = Layout(
        objects=[
            LayoutObject(id="cat", phrase="a cat", box=(0.1, 0.4, 0.4, 0.9)),
            LayoutObject(id="lamp", phrase="a red lamp", box=(0.6, 0.1, 0.8, 0.9)),
        ],
        background="a living room",
    )
    # Room for the answer's objects and the two it may leave out, kept by repair. The grammar caps an answer
    # at 4 objects, but repair splits a counted phrase ("three ...") into boxes, so 4 can become many more:
    # the layout's own cap is the room (when an answer fills it, the left-out objects are said to be capped).
    planner = _config(local_planner, max_objects=MAX_OBJECTS)
    layout, report = planner.revise_with_report([Turn(text="a cat and a lamp", layout=previous)], "make it night")
    if not {"cat", "lamp"} <= {o.id for o in layout.objects}:
        assert len(layout.objects) == MAX_OBJECTS and any(w.tag == "capped" for w in layout.warnings)
    assert report.asks <= 2
    # what the random model left out came back unchanged, with a warning saying so
    for warning in (w for w in layout.warnings if w.tag == "kept"):
        object_id = warning.text.split("(")[1].split(")")[0]
        assert layout.object(object_id) == previous.object(object_id)


def test_cancel_stops_generation_within_a_bounded_number_of_tokens(local_planner):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 6  # the planner asks once before generating, then once per token

    with pytest.raises(PlanCanceled) as info:
        _config(local_planner).plan("a cat", should_cancel=should_cancel)
    assert info.value.tokens == 6 and len(calls) == 7


def test_output_length_limit_ends_in_bad_output_not_a_hang(local_planner):
    short = _config(local_planner, max_tokens=16, max_reasks=2)
    with pytest.raises(LLMBadOutput, match=r"in 2 asks; .*cut at max_tokens=16") as info:
        short.plan("a cat")
    assert info.value.asks == 2
    completion = short.client.complete(chat_messages(short.template, [], CAPTION_PREFIX + "a cat"))
    assert (completion.finish_reason, completion.record.tokens) == ("length", 16)


def test_time_limit_ends_in_bad_output_not_a_hang(local_planner):
    hurried = _config(local_planner, timeout_s=1e-6, max_reasks=1)
    with pytest.raises(LLMBadOutput, match=r"time limit of 1e-06 s") as info:
        hurried.plan("a cat")
    assert len(info.value.last_text) < 20  # stopped after its first token; the shortest layout has 49 characters


def test_a_missing_model_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(LocalModelUnavailable) as info:
        Planner(LocalLLMConfig(model=str(tmp_path / "nowhere"))).plan("a cat")
    assert str(info.value) == f"the local planner model directory {tmp_path / 'nowhere'} does not exist"


def test_a_hub_model_not_downloaded_while_offline_is_a_one_line_error():
    with pytest.raises(LocalModelUnavailable) as info:  # HF_HUB_OFFLINE=1 in tests/conftest.py
        Planner(LocalLLMConfig(model="lmd-test/not-downloaded")).plan("a cat")
    assert str(info.value) == "the local planner model lmd-test/not-downloaded is not downloaded and the hub is offline (HF_HUB_OFFLINE)"


def test_the_planner_modules_do_not_import_torch():
    code = "import sys, layout_planner, layout_planner.planner, layout_planner.local; " \
           "print(sorted(m for m in ('torch', 'transformers', 'llguidance') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
