"""The reference's per-box placement (centred, then moved to the box), composition's step 0 and
the final pass's phrase groups, on hand-made tensors (no model: these are the fast tests that
mutation testing runs, see docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch

from grounded_sd.compose import FLOOR_PADDING, centred_box, compose_latents, mask_box, placement_shift, shift_cells
from grounded_sd.guidance import EnergyTarget, grouped_mean
from grounded_sd.prompts import group_phrases, scene_prompt, scene_token_indices
from grounded_sd.random_model import write_clip_tokenizer
from layout_planner.layout import Layout


def test_centred_box_keeps_the_size_centres_it_and_stands_it_above_the_floor():
    assert centred_box((0.1, 0.2, 0.3, 0.5)) == pytest.approx((0.4, 0.5, 0.6, 0.8))
    assert 1.0 - FLOOR_PADDING == pytest.approx(0.8)
    # taller than 0.8: cut at the top under the reference's rule (test_reference_rules.py), from the top on_canvas
    assert centred_box((0.0, 0.0, 0.4, 0.9), "on_canvas") == pytest.approx((0.3, 0.0, 0.7, 0.9))


def test_placement_moves_the_mask_centre_onto_the_box_centre_in_whole_grid_cells():
    """The on_canvas rule (ours before issue 23); the reference's is pinned in test_reference_rules.py."""
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[2:4, 1:3] = True  # centre of mass (0.25, 0.375) of the canvas
    shift = placement_shift(cells, (0.5, 0.5, 1.0, 1.0), grid=(4, 4), rule="on_canvas")
    assert shift == (2, 2)  # +0.5 and +0.375 of the canvas, in quarters (rounded)
    moved = shift_cells(cells, shift, grid=(4, 4))
    assert moved[6:8, 5:7].all() and int(moved.sum()) == 4
    # the same shift on a finer map moves by the same fraction of the canvas
    fine = torch.zeros(1, 16, 16)
    fine[0, 4, 2] = 1.0
    assert shift_cells(fine, shift, grid=(4, 4))[0, 12, 10] == 1.0
    # what leaves the canvas is dropped, what enters is zero
    assert not shift_cells(cells, (4, 0), grid=(4, 4)).any()
    assert placement_shift(torch.zeros(8, 8, dtype=torch.bool), (0, 0, 1, 1), (4, 4)) == (0, 0)
    assert placement_shift(torch.zeros(8, 8, dtype=torch.bool), (0, 0, 1, 1), (4, 4), "on_canvas") == (0, 0)
    # cell centres (+0.5), each axis with its own box edges: one cell at row 1, column 6 -> (0.8125, 0.1875)
    one = torch.zeros(8, 8, dtype=torch.bool)
    one[1, 6] = True
    assert placement_shift(one, (0.0, 0.5, 0.25, 0.9), grid=(8, 8), rule="on_canvas") == (-6, 4)  # to (0.125, 0.7)
    # a box at the bottom edge: rounding to whole grid cells never pushes the mask off the canvas
    low = torch.zeros(8, 8, dtype=torch.bool)
    low[5:7, 3:5] = True  # centre y 0.75; the box's centre 0.99 would round to +1 quarter = 2 rows: off by one row
    shift = placement_shift(low, (0.4, 0.98, 0.6, 1.0), grid=(4, 4), rule="on_canvas")
    assert shift == (0, 0) and shift_cells(low, shift, grid=(4, 4)).sum() == 4
    top = torch.zeros(8, 8, dtype=torch.bool)
    top[1:3, 0:2] = True
    assert placement_shift(top, (0.0, 0.0, 0.02, 0.02), grid=(4, 4), rule="on_canvas") == (0, 0)


def test_step_zero_pastes_initial_noise_in_the_mask_bounding_box():
    per_box = torch.stack([torch.full((1, 1, 6, 6), 1.0), torch.full((1, 1, 6, 6), 2.0)])  # steps+1=2, one object
    masks = torch.zeros(1, 6, 6, dtype=torch.bool)
    masks[0, 2, 2] = masks[0, 3, 3] = True  # a diagonal pair: its bounding box 2..3, grown by one: 1..4
    background = torch.full((1, 1, 6, 6), -1.0)
    composed, owner = compose_latents(per_box, masks, background)
    box = mask_box(masks[0])
    assert composed.shape == (2, 1, 1, 6, 6) and composed.dtype == per_box.dtype and owner.dtype == torch.long
    assert composed[0, 0, 0][box].eq(1.0).all() and composed[0, 0, 0][~box].eq(-1.0).all() and int(box.sum()) == 16
    assert composed[1, 0, 0][masks[0]].eq(2.0).all() and composed[1, 0, 0][~masks[0]].eq(0.0).all()  # later: the mask only
    only_mask, _ = compose_latents(per_box, masks, background, step0="mask")
    assert only_mask[0, 0, 0][masks[0]].eq(1.0).all() and only_mask[0, 0, 0][~masks[0]].eq(-1.0).all()
    assert owner.eq(1).equal(masks[0])
    with pytest.raises(ValueError, match="unknown step0 'box'"):
        compose_latents(per_box, masks, background, step0="box")


def test_mask_box_is_the_grown_bounding_box_clipped_to_the_grid():
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[0, 0] = True  # one cell in the corner: rows 0..1, columns 0..1
    assert mask_box(mask).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[2, 5] = True
    assert mask_box(mask, margin=0).equal(mask)
    assert mask_box(mask).sum() == 3 * 3 and mask_box(mask)[1:4, 4:7].all()
    assert not mask_box(torch.zeros(4, 7, dtype=torch.bool)).any()


def test_larger_masks_are_pasted_first_at_step_zero_too():
    per_box = torch.stack([torch.full((2, 1, 8, 8), 1.0), torch.full((2, 1, 8, 8), 2.0)], dim=1)  # 2 objects
    small, large = torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
    small[5, 5] = True  # its grown box: rows and columns 4..6
    large[1:5, 1:5] = True
    composed, owner = compose_latents(per_box, torch.stack([small, large]), torch.zeros(1, 1, 8, 8))
    step0 = composed[0, 0, 0]
    assert step0[5, 5] == 1.0 and step0[6, 6] == 1.0 and step0[6, 4] == 1.0  # the small one's box lies on the large one's
    assert step0[4, 4] == 2.0 and step0[0, 0] == 2.0  # but every mask is pasted over every box
    assert step0[7, 7] == 0.0 and owner[5, 5] == 1 and owner[1, 1] == 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_duplicate_phrases_read_the_count_word_and_weigh_each_group_once(tokenizer):
    layout = Layout.model_validate(
        {
            "objects": [
                {"id": "a1", "phrase": "an apple", "box": [0.0, 0.0, 0.3, 0.3]},
                {"id": "a2", "phrase": "an apple", "box": [0.4, 0.0, 0.7, 0.3]},
                {"id": "cat", "phrase": "a cat", "box": [0.5, 0.5, 1.0, 1.0]},
            ],
            "background": "a kitchen",
        }
    )
    groups = group_phrases(layout)
    prompt = scene_prompt(layout.background, groups)
    assert prompt == "a kitchen with two apples and a cat"
    ids = tokenizer(prompt).input_ids
    with_count = scene_token_indices(tokenizer, layout.background, groups, count_words=True)
    without = scene_token_indices(tokenizer, layout.background, groups)
    assert tokenizer.decode([ids[i] for i in with_count["an apple"]]) == "two apples"
    assert tokenizer.decode([ids[i] for i in without["an apple"]]) == "apples"
    assert with_count["a cat"] == without["a cat"]

    box = (0.0, 0.0, 1.0, 1.0)
    targets = [EnergyTarget(i, (1,), box, (box,), group=g) for i, g in (("a1", "apple"), ("a2", "apple"), ("cat", "cat"))]
    values = [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(10.0)]
    assert float(grouped_mean(values, targets)) == pytest.approx((2.0 + 10.0) / 2)  # not (1 + 3 + 10) / 3
    ungrouped = [EnergyTarget(t.object_id, t.token_indices, t.box, t.boxes) for t in targets]
    assert float(grouped_mean(values, ungrouped)) == pytest.approx(14.0 / 3)


@pytest.mark.parametrize("shift", [(1, 0), (-1, 0), (0, 1), (0, -1), (2, -1), (-3, 1), (4, 0), (0, -2)])
def test_shift_cells_moves_by_whole_grid_cells_on_a_wide_canvas(shift):
    tensor = torch.arange(1, 4 * 8 + 1, dtype=torch.float32).view(1, 4, 8)  # H 4, W 8 on a grid of 2 x 4: 2 pixels per cell
    moved = shift_cells(tensor, shift, grid=(2, 4))
    dx, dy = shift[0] * 2, shift[1] * 2
    expected = torch.zeros_like(tensor)
    for y in range(4):
        for x in range(8):
            if 0 <= y - dy < 4 and 0 <= x - dx < 8:
                expected[0, y, x] = tensor[0, y - dy, x - dx]
    assert torch.equal(moved, expected)
