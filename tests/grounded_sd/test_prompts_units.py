"""Prompts of the per-box and final passes and where each phrase's tokens sit (§2.3, §2.6), on
the tiny CLIP tokenizer alone (no model: part of the fast set mutation testing runs)."""

from __future__ import annotations

import pytest

from grounded_sd.prompts import (
    group_phrases,
    join_negative,
    object_prompt,
    object_token_indices,
    scene_prompt,
    scene_token_indices,
    token_indices,
)
from grounded_sd.random_model import write_clip_tokenizer
from layout_planner.layout import Layout


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _layout(*phrases: str) -> Layout:
    objects = [{"id": f"o{i}", "phrase": p, "box": [0.05 * i, 0.0, 0.05 * i + 0.05, 0.5]} for i, p in enumerate(phrases)]
    return Layout.model_validate({"objects": objects, "background": "a park"})


def test_groups_count_identical_phrases_in_first_appearance_order():
    groups = group_phrases(_layout("a cat", "An apple", "a dog", "an apple", "an apple", "a box", "a box", "a lily", "a lily"))
    assert [(g.phrase, g.object_ids, g.text, g.count_word) for g in groups] == [
        ("a cat", ("o0",), "a cat", ""),
        ("An apple", ("o1", "o3", "o4"), "apples", "three"),
        ("a dog", ("o2",), "a dog", ""),
        ("a box", ("o5", "o6"), "boxes", "two"),
        ("a lily", ("o7", "o8"), "lilies", "two"),
    ]
    assert group_phrases(_layout(*["the red car"] * 12))[0].count_word == "12"
    assert group_phrases(_layout("red car", "red car"))[0].text == "red cars"  # no article to drop
    assert group_phrases(_layout("a toy", "a toy"))[0].text == "toys"  # vowel + y: plain s


def test_prompts_of_both_passes():
    assert object_prompt("a park", "a dog") == "a park with a dog"
    assert scene_prompt("a park", group_phrases(_layout())) == "a park"
    assert scene_prompt("a park", group_phrases(_layout("a dog"))) == "a park with a dog"
    assert scene_prompt("a park", group_phrases(_layout("a dog", "a cat", "a cat", "a car"))) == "a park with a dog, two cats and a car"
    assert join_negative(" dogs ", None, "", "  ", "blurry") == "dogs, blurry"


def test_token_positions_match_the_encoded_prompt(tokenizer):
    ids = tokenizer("a park with a red cat").input_ids
    positions = object_token_indices(tokenizer, "a park", "a red cat")
    assert positions == tuple(range(positions[0], positions[-1] + 1)) and positions[-1] == len(ids) - 2  # just before the end token
    assert tokenizer.decode([ids[i] for i in positions]) == "a red cat"
    groups = group_phrases(_layout("a dog", "a cat", "a cat", "a car"))
    prompt = scene_prompt("a park", groups)
    ids = tokenizer(prompt).input_ids
    found = scene_token_indices(tokenizer, "a park", groups)
    assert {p: tokenizer.decode([ids[i] for i in found[p]]) for p in found} == {"a dog": "a dog", "a cat": "cats", "a car": "a car"}
    with_counts = scene_token_indices(tokenizer, "a park", groups, count_words=True)
    assert tokenizer.decode([ids[i] for i in with_counts["a cat"]]) == "two cats"
    assert with_counts["a car"] == found["a car"] and with_counts["a dog"] == found["a dog"]


def test_tokens_past_the_limit_are_dropped(tokenizer):
    prefix = " ".join(["red"] * 74)
    assert len(tokenizer(prefix, add_special_tokens=False).input_ids) == 74
    assert token_indices(tokenizer, prefix, "a red dog") == (75,)  # BOS + 74 = 75; 76 is the end token's place
    assert token_indices(tokenizer, " ".join(["red"] * 80), "a dog") == ()
    assert token_indices(tokenizer, "a", "") == ()


def test_scene_positions_follow_the_separators_when_and_is_not_one_token(tmp_path):
    from grounded_sd.random_model import WORDS

    tokenizer = write_clip_tokenizer(tmp_path, [w for w in WORDS if w != "and"])  # "and" splits into characters
    groups = group_phrases(_layout("a dog", "a cat", "a car"))
    ids = tokenizer(scene_prompt("a park", groups)).input_ids
    found = scene_token_indices(tokenizer, "a park", groups)
    assert {p: tokenizer.decode([ids[i] for i in found[p]]) for p in found} == {"a dog": "a dog", "a cat": "a cat", "a car": "a car"}
