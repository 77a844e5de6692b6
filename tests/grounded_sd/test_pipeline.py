"""The layout-grounded controller end to end on the tiny random SD (CPU, 64x64, few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_sd import (
    GenerationCanceled,
    InvalidLayoutError,
    InvalidOptions,
    InvalidSize,
    LMDOptions,
    LMDPipeline,
    UnknownVariant,
    VariantUnavailable,
)
from layout_planner.layout import Layout
from layout_planner.rescale import rescale_boxes
from tests.support.builders import box_object, layout_data, park_layout_data, same_phrase_objects

SIZE = 64
LAYOUT = park_layout_data(box_object("ball", "a blue ball", (0.6, 0.05, 0.85, 0.3)))


def two_apples_and_a_cat(apple_1, apple_2, cat, **fields) -> dict:
    """A kitchen with a repeated phrase (two apples, grouped in the scene prompt) and a cat."""
    apples = (box_object("a1", "an apple", apple_1), box_object("a2", "an apple", apple_2))
    return layout_data(*apples, box_object("cat", "a cat", cat), background="a kitchen", **fields)


def opts(**overrides) -> LMDOptions:
    return LMDOptions.reference(**{"steps": 6, **overrides})


def generate(pipe: LMDPipeline, layout=LAYOUT, seed: int = 7, **kwargs):
    kwargs.setdefault("options", opts())
    return pipe(layout, seed=seed, width=SIZE, height=SIZE, **kwargs)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class UNetCalls:
    """Counts real UNet forwards as they start, with a forward pre-hook (no patching of our code)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.count = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1

    def close(self) -> None:
        self.handle.remove()


def test_same_seed_same_image_other_seed_other_image(tiny_pipeline):
    first = generate(tiny_pipeline, seed=11)
    again = generate(tiny_pipeline, seed=11)
    other = generate(tiny_pipeline, seed=12)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert np.abs(pixels(first.image) - pixels(other.image)).mean() > 1.0
    assert first.image.size == (SIZE, SIZE) and first.image.mode == "RGB"
    assert set(first.masks) == {"cat", "dog", "ball"}
    assert all(m.mode == "L" and m.size == (SIZE, SIZE) for m in first.masks.values())


def test_moving_one_object_keeps_the_others_per_box_latents(tiny_pipeline):
    moved = {**LAYOUT, "objects": [dict(o) for o in LAYOUT["objects"]]}
    moved["objects"][1]["box"] = [0.1, 0.55, 0.5, 0.95]  # the dog moves
    before = generate(tiny_pipeline, seed=5).intermediates
    after = generate(tiny_pipeline, layout=moved, seed=5).intermediates
    assert before.object_ids == after.object_ids == ["cat", "dog", "ball"]
    for index, object_id in enumerate(before.object_ids):
        same = torch.allclose(before.per_box_latents[:, index], after.per_box_latents[:, index], atol=1e-4)
        assert same == (object_id != "dog"), object_id


def test_guidance_lowers_each_objects_energy_in_the_report(tiny_pipeline):
    result = generate(tiny_pipeline, options=opts(loss_threshold=0.0))
    for obj in result.report.objects:
        energy = obj.per_box_energy
        assert energy.iterations > 0
        assert energy.after_first_step < energy.start, obj.id
        assert result.report.objects[0].final_energy.start is not None
    per_box = next(s for s in result.report.stages if s.name == "per_box")
    assert per_box.unet.backward == per_box.unet.backward_samples // 3 > 0  # guidance batched over the 3 objects


def test_without_guided_steps_there_is_no_backward(tiny_pipeline):
    result = generate(tiny_pipeline, options=opts(guidance_steps=0))
    assert result.report.unet_total.backward == 0
    assert all(o.per_box_energy.start is None for o in result.report.objects)


def test_per_box_pass_is_one_unet_call_per_step_for_all_objects(tiny_pipeline):
    options = opts(guidance_steps=0)
    result = generate(tiny_pipeline, options=options)
    per_box = next(s for s in result.report.stages if s.name == "per_box")
    assert per_box.steps == options.steps
    assert per_box.unet.forward == options.steps
    assert per_box.unet.forward_batch_sizes == {6: options.steps}  # 3 objects x (uncond, cond)

    chunked = generate(tiny_pipeline, options=opts(guidance_steps=0, max_batch=4))
    per_box = next(s for s in chunked.report.stages if s.name == "per_box")
    assert per_box.unet.forward_batch_sizes == {4: options.steps, 2: options.steps}
    assert np.abs(pixels(chunked.image) - pixels(result.image)).max() <= 1


def test_frozen_steps_copy_the_composed_foreground(tiny_pipeline):
    options = opts(steps=8, frozen_ratio=0.5)
    result = generate(tiny_pipeline, options=options)
    inter = result.intermediates
    foreground = inter.owner > 0
    assert foreground.any() and (~foreground).any()
    frozen = options.frozen_steps()
    assert inter.composed.shape[0] == frozen + 1
    for step in range(1, frozen + 1):
        assert torch.equal(inter.final_latents[step][..., foreground], inter.composed[step][..., foreground])
    # the final pass starts from the composition: background noise plus each object's start inside its mask
    assert torch.equal(inter.final_latents[0], inter.composed[0])
    # after the frozen steps the foreground evolves freely
    last = inter.final_latents[-1][..., foreground]
    assert not torch.allclose(last, inter.per_box_latents[-1, 0][..., foreground], atol=1e-3)


def test_every_object_is_composed_where_its_mask_is(tiny_pipeline):
    # generated in place, so composed cells hold the per-box latents unmoved (centred: tests/grounded_sd/test_reference_parity.py)
    result = generate(tiny_pipeline, options=opts(per_box_placement="in_place"))
    inter = result.intermediates
    owners = set(inter.owner.unique().tolist())
    for index, object_id in enumerate(inter.object_ids):
        cells = inter.owner == index + 1
        if not cells.any():
            continue
        assert inter.latent_masks[object_id][cells].all()
        assert torch.equal(inter.composed[1:, 0][..., cells], inter.per_box_latents[1 : inter.composed.shape[0], index][..., cells])
    assert owners - {0}


@pytest.mark.parametrize("stage_to_stop", ["per_box", "final"])
def test_cancel_stops_within_one_step(tiny_pipeline, stage_to_stop):
    events: list[tuple[str, int, int]] = []
    calls = UNetCalls(tiny_pipeline.unet)
    flipped_at: dict[str, int] = {}

    def progress(stage: str, step: int, total: int) -> None:
        events.append((stage, step, total))
        if stage == stage_to_stop and step == 2 and not flipped_at:
            flipped_at.update(events=len(events), calls=calls.count)

    try:
        with pytest.raises(GenerationCanceled):
            generate(tiny_pipeline, progress=progress, should_cancel=lambda: bool(flipped_at))
    finally:
        calls.close()
    assert flipped_at, "the run never reached the step where it should be canceled"
    assert len(events) == flipped_at["events"]  # no progress after the flip
    assert calls.count == flipped_at["calls"]  # no UNet call after the flip


def test_cancel_inside_guidance_stops_before_the_next_iteration(tiny_pipeline):
    calls = UNetCalls(tiny_pipeline.unet)
    try:
        with pytest.raises(GenerationCanceled):
            # step 0 has 4 guidance iterations; cancel as soon as the first guided forward ran
            generate(tiny_pipeline, options=opts(loss_threshold=0.0), should_cancel=lambda: calls.count >= 1)
    finally:
        calls.close()
    assert calls.count == 1


def test_progress_covers_every_step_of_every_stage(tiny_pipeline):
    events: list[tuple[str, int, int]] = []
    options = opts()
    generate(tiny_pipeline, options=options, progress=lambda *e: events.append(e))
    stages = [e[0] for e in events]
    assert stages == ["per_box"] * options.steps + ["masks"] * 3 + ["final"] * options.steps
    assert [e[1] for e in events if e[0] == "final"] == list(range(1, options.steps + 1))
    assert all(e[2] == options.steps for e in events if e[0] != "masks")


def test_fast_preset_runs_a_shorter_per_box_pass(tiny_pipeline):
    reference = generate(tiny_pipeline, options=LMDOptions.reference(steps=10))
    fast = generate(tiny_pipeline, options=LMDOptions.fast(steps=10))
    assert reference.report.per_box_steps == 10
    assert fast.report.per_box_steps == 4  # the frozen point: later per-box latents are never used
    assert fast.intermediates.per_box_latents.shape[0] == 5
    assert fast.report.unet_total.forward_samples < reference.report.unet_total.forward_samples
    assert fast.report.unet_total.backward_samples < reference.report.unet_total.backward_samples
    assert any("per-box pass stopped at step 4 of 10; masks made from its attention" in note for note in fast.report.notes)


def test_sd_baseline_uses_the_layout_prompt(tiny_pipeline):
    layout = two_apples_and_a_cat((0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9), (0.5, 0.1, 0.9, 0.4), negative="dog")
    result = generate(tiny_pipeline, layout=layout, variant="sd")
    assert result.report.prompt == "a kitchen with two apples and a cat"
    assert result.report.negative_prompt.startswith("dog, ")
    assert [s.name for s in result.report.stages] == ["sd"]
    assert result.masks == {}
    assert result.report.unet_total.backward == 0


def test_empty_layout_renders_the_background_with_a_note(tiny_pipeline):
    result = generate(tiny_pipeline, layout={"objects": [], "background": "a realistic kitchen", "negative": "cat"})
    assert result.image.size == (SIZE, SIZE)
    assert result.report.prompt == "a realistic kitchen"
    assert any("no objects" in note for note in result.report.notes)
    assert [s.name for s in result.report.stages] == ["sd"]


def test_bad_inputs_are_typed_errors_that_name_the_problem(tiny_pipeline):
    too_many = layout_data(*same_phrase_objects([(0.0, 0.0, 0.5, 0.5)] * 4))
    with pytest.raises(InvalidLayoutError, match="4 objects; at most 3"):
        generate(tiny_pipeline, layout=too_many, options=opts(max_objects=3))
    with pytest.raises(InvalidSize, match="width"):
        tiny_pipeline(LAYOUT, seed=1, width=60, height=64, options=opts())
    with pytest.raises(InvalidSize, match="height"):
        tiny_pipeline(LAYOUT, seed=1, width=64, height=0, options=opts())
    bad_box = layout_data(box_object(box=(0.5, 0.5, 0.5, 0.9)))
    with pytest.raises(InvalidLayoutError, match=r"objects\.0\.box.*zero area"):
        generate(tiny_pipeline, layout=bad_box)
    with pytest.raises(VariantUnavailable, match="GLIGEN"):
        generate(tiny_pipeline, variant="lmd_plus")
    with pytest.raises(UnknownVariant, match="unknown variant"):
        generate(tiny_pipeline, variant="sdxl")
    with pytest.raises(InvalidOptions, match="not cross-attention modules"):
        generate(tiny_pipeline, options=opts(attention_layers=["up_blocks.9.attentions.0.transformer_blocks.0.attn2"]))


def test_layout_object_and_save_write_every_output(tiny_pipeline, tmp_path):
    layout = Layout.model_validate(LAYOUT)
    result = generate(tiny_pipeline, layout=layout)
    out = result.save(tmp_path / "out")
    for name in ("image.png", "overlay.png", "layout.json", "report.json", "masks/cat.png", "masks/dog.png", "masks/ball.png"):
        assert (out / name).is_file(), name
    assert Layout.model_validate_json((out / "layout.json").read_text()) == result.layout  # the boxes as generated
    assert rescale_boxes(layout)[0] == result.layout and result.layout.phrases() == layout.phrases()
    report = result.report
    assert {s.name for s in report.stages} == {"per_box", "masks", "final"}
    assert report.unet_total.forward == sum(s.unet.forward for s in report.stages)
    assert report.unet_total.forward_samples == sum(size * n for size, n in report.unet_total.forward_batch_sizes.items())
    assert 0 < report.unet_total.forward_s < report.wall_s and report.unet_total.backward_s > 0
    for obj in report.objects:
        assert obj.mask_source in {"sam", "attention", "box"}
        assert 0 < obj.mask_area <= 1 and 0 <= obj.mask_box_iou <= 1
        assert obj.token_count > 0
    assert not np.array_equal(pixels(result.overlay), pixels(result.image))


def test_sam_refines_masks_through_the_real_predictor(tiny_pipeline, tiny_sam_predictor):
    from tests.support.tiny_sam import set_predicted_ious

    set_predicted_ious(tiny_sam_predictor.model, (0.95, 0.95, 0.95))
    pipe = LMDPipeline(
        tiny_pipeline.unet, tiny_pipeline.vae, tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, tiny_pipeline.scheduler,
        sam_predictor=tiny_sam_predictor,
    )
    result = generate(pipe, options=opts(masks={"sam_min_coarse_iou": 0.0}))
    details = [o.mask_detail for o in result.report.objects]
    assert all("SAM not configured" not in d for d in details)
    assert any(o.mask_source == "sam" for o in result.report.objects), details


def test_lmd_plus_uses_gligen_on_the_first_steps_only(tiny_gligen_sd_path):
    pipe = LMDPipeline.from_pretrained(tiny_gligen_sd_path, device="cpu")
    assert pipe.supports_gligen
    grounded: list[int] = []
    handle = pipe.unet.position_net.register_forward_hook(lambda m, a, o: grounded.append(o.shape[0]))
    events: list[tuple[str, int, int]] = []
    try:
        options = opts(steps=5, loss_threshold=0.0)
        result = pipe(LAYOUT, seed=3, variant="lmd_plus", width=SIZE, height=SIZE, options=options, progress=lambda *e: events.append(e))
    finally:
        handle.remove()
    per_box = next(s for s in result.report.stages if s.name == "per_box")
    final = next(s for s in result.report.stages if s.name == "final")
    assert per_box.unet.backward == 0  # no guidance in the per-box pass of LMD+
    assert final.unet.backward > 0
    gligen_steps = options.gligen_steps()
    assert gligen_steps == 2
    # per-box: one grounded CFG call (batch 6) per GLIGEN step; final: CFG (batch 2) plus guidance forwards (batch 1)
    assert grounded.count(6) == gligen_steps
    assert grounded.count(2) == gligen_steps
    assert len(result.masks) == 3


def test_lmd_plus_generates_differently_from_lmd(tiny_gligen_sd_path):
    pipe = LMDPipeline.from_pretrained(tiny_gligen_sd_path, device="cpu")
    plus = pipe(LAYOUT, seed=3, variant="lmd_plus", width=SIZE, height=SIZE, options=opts(steps=4))
    plain = pipe(LAYOUT, seed=3, variant="lmd", width=SIZE, height=SIZE, options=opts(steps=4))
    assert not np.array_equal(pixels(plus.image), pixels(plain.image))


def test_a_sigma_scheduler_by_class_name(tiny_sd_path):
    pipe = LMDPipeline.from_pretrained(tiny_sd_path, device="cpu", scheduler="EulerDiscreteScheduler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    result = generate(pipe, options=opts(loss_threshold=0.0))
    assert np.isfinite(np.asarray(result.image, dtype=np.float32)).all()
    assert all(o.per_box_energy.after_first_step < o.per_box_energy.start for o in result.report.objects)


def test_unknown_scheduler_and_missing_model_are_load_errors(tiny_sd_path, tmp_path):
    from grounded_sd import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown scheduler 'NoSuchScheduler'"):
        LMDPipeline.from_pretrained(tiny_sd_path, device="cpu", scheduler="NoSuchScheduler")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        LMDPipeline.from_pretrained(tmp_path, device="cpu")


def test_non_square_image_with_repeated_phrases(tiny_pipeline):
    layout = two_apples_and_a_cat((0.05, 0.1, 0.3, 0.9), (0.35, 0.1, 0.6, 0.9), (0.65, 0.2, 0.95, 0.95))
    result = tiny_pipeline(layout, seed=2, width=96, height=32, options=opts(loss_threshold=0.0))
    assert result.image.size == (96, 32)
    assert all(m.size == (96, 32) for m in result.masks.values())
    assert result.report.prompt == "a kitchen with two apples and a cat"
    assert result.intermediates.per_box_latents.shape[-2:] == (16, 48)
    for obj in result.report.objects:
        assert obj.final_energy.start is not None and obj.final_energy.iterations > 0
