"""The `reference` preset's rules (issue 23), each pinned with numbers computed by hand from the
reference's own rule (TonyLianLong/LLM-groundedDiffusion, file and line cited per test), with
today's former behaviour kept as a named option and pinned too. Model-free: these are among the
judges of mutation testing (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from grounded_sd.attention import box_cells, box_mask
from grounded_sd.compose import Box, centred_box, on_canvas, placement_shift, shift_cells
from grounded_sd.denoise import Run, energy_loss
from grounded_sd.final_pass import gligen_phrases, scene_targets
from grounded_sd.guidance import EnergyTarget, GuidanceTrace, guidance_step_size, object_energy
from grounded_sd.options import DEFAULT_NEGATIVE, QUALITY_NEGATIVE, QUALITY_SINGLE_OBJECT_NEGATIVE, LMDOptions
from grounded_sd.per_box import PerBoxResult, align_to_layout, box_negative
from grounded_sd.random_model import write_clip_tokenizer
from layout_planner.layout import Layout

# prompt.py:43-44 of the reference, verbatim: what its per-box and final passes use as negatives
REFERENCE_SO_NEGATIVE = (
    "artifacts, blurry, smooth texture, bad quality, distortions, unrealistic, distorted image, bad proportions, "
    "duplicate, two, many, group, occlusion, occluded, side, border, collate"
)
REFERENCE_OVERALL_NEGATIVE = (
    "artifacts, blurry, smooth texture, bad quality, distortions, unrealistic, distorted image, bad proportions, duplicate"
)


def _reference_scale_proportion(box: Box, h: int, w: int) -> tuple[int, int, int, int]:
    """utils/utils.py:57-70 of the reference (``use_legacy=False``), restated: corner and size rounded apart."""
    x_min, y_min = round(box[0] * w), round(box[1] * h)
    box_w, box_h = round((box[2] - box[0]) * w), round((box[3] - box[1]) * h)
    x_max, y_max = x_min + box_w, y_min + box_h
    return max(x_min, 0), max(y_min, 0), min(x_max, w), min(y_max, h)


# --- boxes to cells (utils/utils.py:57-70; used by the energy, guidance.py:113, transfer, guidance.py:206,
# and the per-box noise region, utils/latents.py:138) ---------------------------------------------------------
@pytest.mark.parametrize(
    ("box", "grid", "reference", "edges"),
    [
        # x0*8 = 0.8 -> 1, width 3.6 -> 4: columns 1..5; y0*8 = 2.4 -> 2, height 3.2 -> 3: rows 2..5.
        # edges: int(0.8) = 0 .. round(4.4) = 4; int(2.4) = 2 .. round(5.6) = 6
        ((0.1, 0.3, 0.55, 0.7), 8, (1, 2, 5, 5), (0, 2, 4, 6)),
        # halves go to the even neighbour (Python's round, as the reference): 2.5 -> 2, width 1.5 -> 2
        ((0.3125, 0.0625, 0.5, 0.25), 8, (2, 0, 4, 2), (2, 0, 4, 2)),
        # the same box one cell-and-a-half further keeps its size under the reference's rule: 3.5 -> 4, width 2
        ((0.4375, 0.0625, 0.625, 0.25), 8, (4, 0, 6, 2), (3, 0, 5, 2)),
        # 64x64 (the per-box noise region): 0.305*64 = 19.52 -> 20, width 0.335*64 = 21.44 -> 21; edges: int(19.52) = 19
        ((0.305, 0.5, 0.64, 0.9), 64, (20, 32, 41, 58), (19, 32, 41, 58)),
    ],
)
def test_boxes_become_cells_by_rounding_the_corner_and_the_size_apart(box, grid, reference, edges):
    expected = _reference_scale_proportion(box, grid, grid)
    assert expected == reference
    assert box_cells(box, grid, grid) == reference
    assert box_cells(box, grid, grid, "edges") == edges
    c0, r0, c1, r1 = reference
    mask = box_mask(box, grid, grid)
    assert int(mask.sum()) == (c1 - c0) * (r1 - r0) and mask[r0:r1, c0:c1].all()


def test_box_cells_cut_a_box_above_the_canvas_and_never_come_out_empty():
    # a tall centred box (y0 < 0): the reference keeps y_min + height as the bottom, then cuts y_min to 0
    assert box_cells((0.3, -0.1, 0.7, 0.8), 10, 10) == (3, 0, 7, 8) == _reference_scale_proportion((0.3, -0.1, 0.7, 0.8), 10, 10)
    # under half a cell wide the reference's rule gives no cell at all; here the corner's cell stays (the energy needs one)
    assert _reference_scale_proportion((0.5, 0.5, 0.55, 0.55), 8, 8) == (4, 4, 4, 4)
    assert box_cells((0.5, 0.5, 0.55, 0.55), 8, 8) == (4, 4, 5, 5)
    assert box_cells((1.0, 1.0, 1.0, 1.0), 8, 8) == (7, 7, 8, 8)
    with pytest.raises(ValueError, match="unknown box cell rule 'floor'"):
        box_cells((0.1, 0.1, 0.5, 0.5), 8, 8, "floor")


def test_the_energy_reads_the_reference_cells():
    """One token's map on 4x4 with its mass on column 0; box x 0.125..0.375: the reference's cells are
    column 0 (round(0.5) = 0, width round(1.0) = 1), the edges rule's columns 0-1 (int(0.5) = 0 .. round(1.5) = 2)."""
    probs = torch.zeros(1, 16, 1)
    probs[0, 0::4, 0] = 0.25  # column 0, every row
    box = (0.125, 0.0, 0.375, 1.0)
    assert box_cells(box, 4, 4) == (0, 0, 1, 4) and box_cells(box, 4, 4, "edges") == (0, 0, 2, 4)
    target = EnergyTarget("x", (0,), box, (box,))
    # reference: inside = column 0 (4 cells, k = int(0.8) -> 1): 1 - 0.25; outside 12 cells all 0 -> 0.75
    assert float(object_energy(probs, target, (4, 4), 0.2, 4.0)) == pytest.approx(0.75)
    # with k = every inside cell the two rules differ: the edges rule's box holds four zeros as well
    assert float(object_energy(probs, target, (4, 4), 1.0, 4.0)) == pytest.approx(1 - 0.25)  # k = 4: column 0 exactly
    assert float(object_energy(probs, target, (4, 4), 1.0, 4.0, "edges")) == pytest.approx(1 - 0.125)  # k = 8: half zeros


def _run(options: LMDOptions, hw: tuple[int, int] = (4, 4)) -> Run:
    """The parts of a Run that the loss reads (no model)."""
    return Run(options=options, latent_hw=hw, layers=["l"], recorder=None, counter=None, progress=None, should_cancel=None)


def test_the_pass_loss_uses_the_options_cells_and_adds_the_transfer_term():
    """energy_loss (denoise.py): the energy through ``options.box_cells``, plus ``transfer_weight`` x the
    transfer term (utils/guidance.py:272-284: ``loss += ref_loss / (object_number * num_attn)``, a sum)."""
    probs = torch.zeros(1, 1, 16, 1)
    probs[0, 0, 0::4, 0] = 0.25
    box = (0.125, 0.0, 0.375, 1.0)
    target = EnergyTarget("x", (0,), box, (box,))
    maps = {"l": probs}
    reference = {"l": torch.zeros(1, 1, 16)}
    reference["l"][0, 0, 1::4] = 0.25  # the per-box map: column 1
    opts = LMDOptions.reference(topk_fraction=1.0)
    no_transfer = energy_loss(_run(opts), [target], None, final=True)(maps, [0])[0]
    assert float(no_transfer) == pytest.approx(0.75)
    edges = energy_loss(_run(opts.model_copy(update={"box_cells": "edges"})), [target], None, final=True)(maps, [0])[0]
    assert float(edges) == pytest.approx(0.875)
    # transfer in the reference's cells (column 0): the current map normalises to 1/4 per row, the per-box map is 0
    # there (the eps keeps it 0): L1 = 1; times transfer_weight 2, added
    with_transfer = energy_loss(_run(opts), [target], reference, final=True)(maps, [0])[0]
    assert float(with_transfer) == pytest.approx(0.75 + 2.0 * 1.0)
    # in the edges cells (columns 0-1) both normalise to 1/4 on their own column: L1 = 4 x 1/4 + 4 x 1/4 = 2
    edges_transfer = energy_loss(_run(opts.model_copy(update={"box_cells": "edges"})), [target], reference, final=True)(maps, [0])[0]
    assert float(edges_transfer) == pytest.approx(0.875 + 2.0 * 2.0)


def test_the_transfer_term_pulls_the_latent_toward_the_per_box_maps():
    """The sign of the transfer term in the pass loss: one gradient step on the loss moves the current map
    toward the per-box one (a transfer that pushed it away would pass the value test above at weight 0)."""
    logits = torch.zeros(1, 1, 4, 1, requires_grad=True)  # 2x2 map, one token, softmax over cells below
    box = (0.0, 0.0, 1.0, 1.0)
    target = EnergyTarget("x", (0,), box, (box,))
    reference = {"l": torch.tensor([[[0.7, 0.1, 0.1, 0.1]]])}
    opts = LMDOptions.reference(background_weight=0.0, topk_fraction=1.0)
    loss_fn = energy_loss(_run(opts, (2, 2)), [target], reference, final=True)

    def distance(z: torch.Tensor) -> float:
        current = z.softmax(dim=2)[0, 0, :, 0]
        return float((current - reference["l"][0, 0]).abs().sum())

    loss = loss_fn({"l": logits.softmax(dim=2)}, [0])[0]
    loss.sum().backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert distance(stepped) < distance(logits.detach()) - 0.05


# --- centred placement (utils/utils.py:19-44, 102-121, 145-154; utils/latents.py:85-105) -----------------------
def test_tall_centred_boxes_are_cut_at_the_top_as_the_reference_cuts_them():
    # get_centered_box with floor_padding 0.2: y_max = 0.8, y_min = 0.8 - h, whatever h is
    assert centred_box((0.0, 0.0, 0.4, 0.9)) == pytest.approx((0.3, -0.1, 0.7, 0.8))
    assert centred_box((0.1, 0.2, 0.3, 0.5)) == pytest.approx((0.4, 0.5, 0.6, 0.8))
    # its cells on 64x64: y_min round(-6.4) = -6, height round(57.6) = 58 -> rows 0..52 (cut), not 0..58
    assert box_cells(centred_box((0.0, 0.0, 0.4, 0.9)), 64, 64)[1::2] == (0, 52)
    assert on_canvas(centred_box((0.0, 0.0, 0.4, 0.9))) == pytest.approx((0.3, 0.0, 0.7, 0.8))
    # on_canvas (ours before issue 23): moved down to stay whole
    assert centred_box((0.0, 0.0, 0.4, 0.9), "on_canvas") == pytest.approx((0.3, 0.0, 0.7, 0.9))
    assert centred_box((0.1, 0.2, 0.3, 0.5), "on_canvas") == pytest.approx((0.4, 0.5, 0.6, 0.8))


def test_alignment_takes_the_centre_of_mass_at_cell_indices_and_does_not_clamp():
    # one cell at row 1, column 6 of 8x8: binary_mask_to_center gives (6/8, 1/8) = (0.75, 0.125), no + 0.5
    one = torch.zeros(8, 8, dtype=torch.bool)
    one[1, 6] = True
    # to the centre (0.125, 0.7): x (0.125 - 0.75) * 8 = -5.0 -> -5; y (0.7 - 0.125) * 8 = 4.6 -> 5
    assert placement_shift(one, (0.0, 0.5, 0.25, 0.9), grid=(8, 8)) == (-5, 5)
    # cell centres (0.8125, 0.1875): -5.5 -> -6 (to even), 4.1 -> 4
    assert placement_shift(one, (0.0, 0.5, 0.25, 0.9), grid=(8, 8), rule="on_canvas") == (-6, 4)
    # a mask near the bottom moved to a box at the bottom edge: the reference shifts by the rounded offset even
    # when that pushes rows off the canvas (shift_tensor drops them); on_canvas limits it
    low = torch.zeros(8, 8, dtype=torch.bool)
    low[5:7, 3:5] = True  # centre of mass at indices (3.5/8, 5.5/8) = (0.4375, 0.6875)
    # to (0.5, 0.99) on a 4x4 grid: x 0.0625 * 4 = 0.25 -> 0; y 0.3025 * 4 = 1.21 -> 1 (two rows of 8): rows 7..8, one off
    assert placement_shift(low, (0.4, 0.98, 0.6, 1.0), grid=(4, 4)) == (0, 1)
    assert shift_cells(low, (0, 1), grid=(4, 4)).sum() == 2
    assert placement_shift(low, (0.4, 0.98, 0.6, 1.0), grid=(4, 4), rule="on_canvas") == (0, 0)


def _per_box(maps: torch.Tensor, grid: tuple[int, int]) -> PerBoxResult:
    latents = torch.zeros(2, maps.shape[0], 1, 8, 8)
    return PerBoxResult(latents, None, 1, torch.zeros(maps.shape[0], 4, 4), GuidanceTrace(), {0: {"l": maps}}, [], True, grid)


def test_alignment_moves_the_attention_transfer_maps_with_the_object():
    """align_to_layout (per_box.py; the reference's attn.shift_saved_attns, generation/lmd.py:489-496): each
    object's per-box maps move by its shift, in whole cells of the grid, on every layer's own resolution."""
    maps = torch.zeros(2, 1, 16)  # 2 objects, 1 head, a 4x4 map
    maps[0, 0, 5] = 1.0  # row 1, column 1
    maps[1, 0, 10] = 1.0  # row 2, column 2
    moved = align_to_layout(_per_box(maps, (2, 2)), [(1, 0), (-1, -1)])
    out = moved.reference_maps[0]["l"].view(2, 1, 4, 4)
    assert out[0, 0, 1, 3] == 1.0 and int(out[0].sum()) == 1  # one grid cell of 2 = two map columns right
    assert out[1, 0, 0, 0] == 1.0 and int(out[1].sum()) == 1  # two left, two up
    assert not moved.centred


# --- the final pass's phrases (utils/parse.py:332-349) ------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


APPLES = Layout.model_validate(
    {
        "objects": [
            {"id": "a1", "phrase": "an apple", "box": [0.0, 0.0, 0.3, 0.3]},
            {"id": "cat", "phrase": "a cat", "box": [0.5, 0.5, 1.0, 1.0]},
            {"id": "a2", "phrase": "an apple", "box": [0.4, 0.0, 0.7, 0.3]},
        ],
        "background": "a kitchen",
    }
)


def test_the_final_pass_reads_the_group_count_word(tokenizer):
    """scene_targets (final_pass.py): under phrase_groups="group" an apple's energy reads "two apples", the
    reference's overall phrase (count word and plural, utils/parse.py:339-342); under "object" only "apples"."""
    ids = tokenizer("a kitchen with two apples and a cat").input_ids
    grouped = {t.object_id: t for t in scene_targets(tokenizer, APPLES, by_group=True)}
    assert tokenizer.decode([ids[i] for i in grouped["a1"].token_indices]) == "two apples"
    assert grouped["a1"].token_indices == grouped["a2"].token_indices and grouped["a1"].group == grouped["a2"].group != ""
    assert grouped["a1"].boxes == ((0.0, 0.0, 0.3, 0.3), (0.4, 0.0, 0.7, 0.3))
    single = {t.object_id: t for t in scene_targets(tokenizer, APPLES, by_group=False)}
    assert tokenizer.decode([ids[i] for i in single["a1"].token_indices]) == "apples" and single["a1"].group == ""
    assert tokenizer.decode([ids[i] for i in grouped["cat"].token_indices]) == "a cat"


def test_lmd_plus_gives_gligen_the_group_phrase_of_duplicated_objects():
    # generation/lmd_plus.py:463-467: every box of a phrase group is given the group's phrase ("two apples")
    assert gligen_phrases(APPLES) == ["two apples", "a cat", "two apples"]
    assert gligen_phrases(APPLES, "object") == ["an apple", "a cat", "an apple"]


# --- negatives, noise ratio, frozen steps, step size, presets ----------------------------------------------------
def test_negative_prompts_are_the_reference_words_in_its_order():
    layout = Layout.model_validate({"objects": [], "background": "a park", "negative": "birds"})
    options = LMDOptions.reference()
    assert options.default_negative == DEFAULT_NEGATIVE == REFERENCE_OVERALL_NEGATIVE
    # generation/lmd.py:330-334: extra_neg_prompt + ", " + DEFAULT_SO_NEGATIVE_PROMPT
    assert box_negative(layout, options) == "birds, " + REFERENCE_SO_NEGATIVE
    assert box_negative(Layout.model_validate({"objects": [], "background": "a park"}), options) == REFERENCE_SO_NEGATIVE
    old = LMDOptions.reference(
        default_negative=QUALITY_NEGATIVE, single_object_negative=QUALITY_SINGLE_OBJECT_NEGATIVE, per_box_negative_order="single_object_first"
    )
    assert box_negative(layout, old) == f"{QUALITY_SINGLE_OBJECT_NEGATIVE}, birds, {QUALITY_NEGATIVE}"


def test_box_noise_ratio_is_the_reference_per_variant_unless_set():
    # fg_blending_ratio: generation/lmd.py:240 (0.01), generation/lmd_plus.py:216 (0.1)
    options = LMDOptions.reference()
    assert options.box_noise_ratio is None
    assert options.noise_ratio("lmd") == 0.01 and options.noise_ratio("lmd_plus") == 0.1
    assert LMDOptions.fast().noise_ratio("lmd") == 0.01
    assert LMDOptions.reference(box_noise_ratio=0.1).noise_ratio("lmd") == 0.1


@pytest.mark.parametrize(("steps", "frozen", "floor", "nearest"), [(15, 0.5, 7, 8), (12, 0.4, 4, 5), (50, 0.5, 25, 25), (20, 0.4, 8, 8)])
def test_frozen_and_gligen_steps_take_the_integer_part(steps, frozen, floor, nearest):
    # frozen_steps = int(num_inference_steps * frozen_step_ratio): generation/lmd.py:286, generation/lmd_plus.py:257;
    # num_grounding_steps = int(gligen_scheduled_sampling_beta * len(timesteps)): models/pipelines.py:408
    options = LMDOptions.reference(steps=steps, frozen_ratio=frozen, gligen_ratio=frozen)
    assert options.frozen_steps() == floor == int(steps * frozen) and options.gligen_steps() == floor
    nearest_options = options.model_copy(update={"ratio_steps": "nearest"})
    assert nearest_options.frozen_steps() == nearest == nearest_options.gligen_steps()


def test_guidance_step_size_rules_on_dpm_solver():
    """models/pipelines.py:60-69: sigma^2 whenever the scheduler has sigmas. Under today's diffusers DPM-Solver
    keeps per-step sigmas (14.6 at step 0 of 10), so that rule steps ~200 times further than sqrt(1 - alpha_bar);
    the preset keeps the alpha rule for VP schedulers and offers the reference's as ``step_size="has_sigmas"``."""
    dpm = DPMSolverMultistepScheduler()
    dpm.set_timesteps(10)
    t = dpm.timesteps[0]
    alpha = float((1 - dpm.alphas_cumprod[int(t)]) ** 0.5)
    assert guidance_step_size(dpm, t, 0) == pytest.approx(alpha)
    assert guidance_step_size(dpm, t, 0, "has_sigmas") == pytest.approx(float(dpm.sigmas[0]) ** 2)
    assert float(dpm.sigmas[0]) ** 2 > 100 * alpha
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(10)
    assert guidance_step_size(euler, euler.timesteps[2], 2) == guidance_step_size(euler, euler.timesteps[2], 2, "has_sigmas")
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    t = ddim.timesteps[2]
    assert guidance_step_size(ddim, t, 2, "has_sigmas") == pytest.approx(float((1 - ddim.alphas_cumprod[int(t)]) ** 0.5))
    with pytest.raises(ValueError, match="unknown step size rule"):
        guidance_step_size(ddim, t, 2, "sigma")


def test_the_reference_preset_names_each_rule_and_fast_keeps_the_free_ones():
    reference, fast = LMDOptions.reference(), LMDOptions.fast()
    for options in (reference, fast):
        assert (options.box_cells, options.placement_rule, options.ratio_steps) == ("corner_size", "reference", "floor")
        assert (options.guidance_grounding, options.gligen_phrases, options.per_box_negative_order) == ("null", "group", "layout_first")
        assert options.step_size == "noise_sigma"
    assert (reference.rescale_boxes, fast.rescale_boxes) == (True, False)  # generate.py:206: scale_boxes on by default


def test_sam_defaults_to_the_reference_vit_b():
    import inspect

    from grounded_sd.pipeline import LMDPipeline
    from lmd.settings import Settings

    assert Settings.model_fields["sam_model_type"].default == "vit_b"  # models/sam.py:14: facebook/sam-vit-base
    assert inspect.signature(LMDPipeline.from_pretrained).parameters["sam_model_type"].default == "vit_b"


def test_a_mask_the_reference_shift_would_push_off_the_canvas_entirely_is_held_on_it():
    # one cell at column 5 of 8 moved to a box centred at x 0.999 on a 2-cell grid: round((0.999 - 0.625) * 2) = 1
    # grid cell = 4 columns -> column 9: gone. The reference would fail on the empty mask (utils/utils.py:78-82);
    # here the shift is limited to keep it on the canvas
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 5] = True
    assert placement_shift(mask, (0.998, 0.0, 1.0, 0.125), grid=(2, 2)) == (0, 0)
    assert placement_shift(mask, (0.998, 0.0, 1.0, 0.125), grid=(2, 2), rule="on_canvas") == (0, 0)
    mask[0, 3] = mask[0, 6] = True  # columns 3, 5, 6: centre 14/3/8 = 0.583 -> round(0.83) = 1: column 3 lands on 7, kept
    assert placement_shift(mask, (0.998, 0.0, 1.0, 0.125), grid=(2, 2)) == (1, 0)
    assert shift_cells(mask, (1, 0), grid=(2, 2)).sum() == 1


def test_the_refiner_negative_is_the_layouts_then_the_refiners():
    """generation/sdxl_refinement.py:27: ``extra_neg_prompt + ", " + sdxl_negative_prompt`` (the layout's negative,
    not the generation's default words); ``negative="scene"`` keeps the whole generation negative (ours before)."""
    from PIL import Image

    from grounded_sd.refiner import REFINER_NEGATIVE, RefinerOptions, refiner_negative
    from grounded_sd.report import GenerationReport, GenerationResult

    layout = Layout.model_validate({"objects": [], "background": "a park", "negative": "birds"})
    report = GenerationReport(variant="lmd", seed=0, width=8, height=8, steps=1, prompt="a park", negative_prompt=f"birds, {DEFAULT_NEGATIVE}")
    result = GenerationResult(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), {}, layout, report)
    assert RefinerOptions().negative == "layout"
    assert refiner_negative(result) == f"birds, {REFINER_NEGATIVE}"
    assert refiner_negative(result, "scene") == f"birds, {DEFAULT_NEGATIVE}, {REFINER_NEGATIVE}"
    result.layout = Layout.model_validate({"objects": [], "background": "a park"})
    assert refiner_negative(result) == REFINER_NEGATIVE


def test_schedules_at_twenty_steps_scaled_by_default_absolute_as_the_reference_reads_them():
    """The reference indexes its schedule by absolute step (``max_iter[index]`` while ``index < max_index_step``,
    models/pipelines.py:20-25; ``attn_aggregation_step_start = 10``, generation/lmd.py:36). `reference` scales
    those indices to the step count (it ran 50 steps, where both agree); ``step_schedule="absolute"`` reads them."""
    scaled, absolute = LMDOptions.reference(steps=20), LMDOptions.reference(steps=20, step_schedule="absolute")
    assert scaled.step_schedule == "scaled"
    # scaled: 30 of 50 -> 12 guided steps; 4 iterations on steps 0-1, 3 on 2-3, 2 on 4-7, 1 on 8-11
    assert scaled.guided_steps() == 12 and [scaled.iterations_at(i) for i in range(20)] == [4, 4, 3, 3] + [2] * 4 + [1] * 4 + [0] * 8
    assert scaled.mask_first_step() == 4
    # absolute (max_iter = [4]*5 + [3]*5 + [2]*10 + [1]*10, max_index_step 30): every one of the 20 steps is guided
    assert absolute.guided_steps() == 20 and [absolute.iterations_at(i) for i in range(20)] == [4] * 5 + [3] * 5 + [2] * 10
    assert absolute.mask_first_step() == 10
    full = LMDOptions.reference(), LMDOptions.reference(step_schedule="absolute")
    assert [full[0].iterations_at(i) for i in range(50)] == [full[1].iterations_at(i) for i in range(50)]


def test_an_image_mask_becomes_latent_cells_by_the_bilinear_sample_at_each_cell_centre():
    """models/sam.py:51: ``F.interpolate(mask, (H, W), mode='bilinear').type(torch.bool)``: at 8 pixels per cell
    the sample at a cell's centre reads its pixels 3 and 4 in each direction; any of them set -> the cell is in."""
    from grounded_sd.compose import mask_to_latent

    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[8:16, 8:12] = True  # cell (1, 1) half covered on its left: pixels 8..11 hold column 11 (its 4th): in
    mask[16:24, 20:24] = True  # cell (2, 2) half covered on its right: columns 20..23 hold 20 (its 5th): in
    mask[32:40, 32:35] = mask[32:40, 37:40] = True  # cell (4, 4): 48 of 64 pixels, but not its centre columns 35, 36: out
    mask[43, 40:48] = True  # cell (5, 5): one row of 8 pixels, its centre row 43: in
    expected = _reference_latent_mask(mask)
    centre = mask_to_latent(mask, 8, 8)
    assert torch.equal(centre, expected)
    assert centre.nonzero().tolist() == [[1, 1], [2, 2], [5, 5]]
    half = mask_to_latent(mask, 8, 8, "half")
    assert half.nonzero().tolist() == [[1, 1], [2, 2], [4, 4]]  # at least 32 of 64 pixels: cells 1, 2 and 4
    one_pixel = torch.zeros(64, 64, dtype=torch.bool)
    one_pixel[11, 12] = True  # the centre pixels of cell (1, 1): (11 or 12) x (11 or 12)
    assert mask_to_latent(one_pixel, 8, 8).nonzero().tolist() == [[1, 1]]
    assert mask_to_latent(one_pixel, 8, 8, "half").nonzero().tolist() == [[1, 1]]  # too small: the cell it touches
    corner = torch.zeros(64, 64, dtype=torch.bool)
    corner[0, 0] = True  # misses every centre: the cell it touches, not nothing
    assert mask_to_latent(corner, 8, 8).nonzero().tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="unknown latent mask rule"):
        mask_to_latent(corner, 8, 8, "any")


def _reference_latent_mask(mask: torch.Tensor) -> torch.Tensor:
    """The reference's line, restated: bilinear to 8x8, then bool."""
    import torch.nn.functional as F

    return F.interpolate(mask[None, None].float(), (8, 8), mode="bilinear").type(torch.bool)[0, 0]
