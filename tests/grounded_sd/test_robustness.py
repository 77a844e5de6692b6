"""Stage 2 under what demanding users run: other schedulers and prediction types, low precision,
many tiny objects with chunked batches, phrases lost to the token limit (tiny random SD, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_sd import LMDOptions, LMDPipeline
from grounded_sd.compose import seeded_noise
from grounded_sd.counters import UNetCounter
from grounded_sd.guidance import GuidanceTrace, guide_latents
from tests.support.builders import layout_data, park_layout_data, same_phrase_objects

LAYOUT = park_layout_data()


def with_scheduler(pipe: LMDPipeline, name: str, **config) -> LMDPipeline:
    """The same loaded components under another scheduler (as from_pretrained(scheduler=name) builds it)."""
    import diffusers

    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **config)
    return LMDPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler)


def test_stochastic_scheduler_is_reproducible_and_keeps_noise_per_object(tiny_pipeline):
    pipe = with_scheduler(tiny_pipeline, "EulerAncestralDiscreteScheduler")
    options = LMDOptions.reference(steps=4, rescale_boxes=False)  # moving the dog must not move the cat
    first = pipe(LAYOUT, seed=11, options=options, width=64, height=64)
    torch.randn(100)  # the global generator must not matter
    second = pipe(LAYOUT, seed=11, options=options, width=64, height=64)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    moved = {**LAYOUT, "objects": [LAYOUT["objects"][0], {**LAYOUT["objects"][1], "box": [0.55, 0.5, 0.9, 0.9]}]}
    third = pipe(moved, seed=11, options=options, width=64, height=64)
    # the cat's per-box pass (its initial and its step noise) does not depend on the dog
    assert torch.allclose(first.intermediates.per_box_latents[:, 0], third.intermediates.per_box_latents[:, 0], atol=1e-4)
    assert not torch.allclose(first.intermediates.per_box_latents[:, 1], third.intermediates.per_box_latents[:, 1], atol=1e-4)


def test_initial_noise_uses_the_scale_of_the_actual_timesteps(tiny_pipeline):
    # Euler with "leading" spacing: init_noise_sigma is ~14.6 before set_timesteps and ~11 after (20 steps)
    pipe = with_scheduler(tiny_pipeline, "EulerDiscreteScheduler", timestep_spacing="leading")
    result = pipe({"objects": [], "background": "a park"}, seed=4, options=LMDOptions(steps=20), variant="sd", width=64, height=64)
    expected = type(pipe.scheduler).from_config(pipe.scheduler.config)
    expected.set_timesteps(20)
    noise = seeded_noise((1, 4, 32, 32), 4, "cpu", torch.float32)
    assert float(expected.init_noise_sigma) < 0.9 * float(pipe.scheduler.init_noise_sigma)
    assert torch.allclose(result.intermediates.final_latents[0], noise * float(expected.init_noise_sigma))


def test_v_prediction_with_dpm_solver_segments_an_x0_prediction(tiny_pipeline):
    pipe = with_scheduler(tiny_pipeline, "DPMSolverMultistepScheduler", prediction_type="v_prediction")
    result = pipe(LAYOUT, seed=2, options=LMDOptions.fast(steps=10, loss_threshold=0.0), width=64, height=64, per_box_images=True)
    assert np.isfinite(np.asarray(result.image, dtype=np.float32)).all()
    assert any("segmented on its x0-prediction" in note for note in result.report.notes), result.report.notes
    assert all(np.isfinite(np.asarray(image, dtype=np.float32)).all() for image in result.intermediates.per_box_images.values())
    assert all(o.per_box_energy.start is not None and o.per_box_energy.iterations > 0 for o in result.report.objects)


def test_bfloat16_guidance_lowers_the_energy_and_stays_finite(tiny_sd_path):
    pipe = LMDPipeline.from_pretrained(tiny_sd_path, device="cpu", dtype="bfloat16")
    result = pipe(LAYOUT, seed=7, options=LMDOptions.reference(steps=4, loss_threshold=0.0), width=64, height=64)
    assert result.report.dtype == "bfloat16"
    assert torch.isfinite(result.intermediates.final_latents).all()
    for obj in result.report.objects:
        energy = obj.per_box_energy
        assert np.isfinite([energy.start, energy.after_first_step]).all()
        assert energy.after_first_step < energy.start, obj.id
    assert not any("not finite" in note for note in result.report.notes)


def test_a_non_finite_gradient_keeps_that_rows_latent():
    # d sqrt(|z|)/dz is infinite at 0: row 1 holds a zero, row 0 does not
    latents = torch.full((2, 1, 2, 2), 2.0)
    latents[1, 0, 0, 0] = 0.0

    def forward(z, rows):
        return {"z": z}

    def loss_fn(maps, rows):
        loss = maps["z"].abs().sqrt().flatten(1).sum(dim=1)
        return loss, [{str(r): float(v)} for r, v in zip(rows, loss.detach())]

    trace = GuidanceTrace()
    guided = guide_latents(
        latents, iterations=1, step_size=0.1, scale=1.0, threshold=0.0, forward=forward, loss_fn=loss_fn,
        counter=UNetCounter(torch.nn.Identity()), max_batch=None, trace=trace,
    )
    assert torch.isfinite(guided).all()
    assert (guided[0] < latents[0]).all()
    assert torch.equal(guided[1], latents[1])
    assert trace.nonfinite_rows == 1


def test_phrases_lost_to_the_token_limit_with_a_zero_threshold(tiny_pipeline):
    layout = {**LAYOUT, "background": " ".join(["a realistic park"] * 30)}
    options = LMDOptions.reference(steps=3, loss_threshold=0.0)
    result = tiny_pipeline(layout, seed=1, options=options, width=64, height=64)
    assert result.report.unet_total.backward == 0  # nothing to guide, and no crash on an energy without gradient
    assert all(o.token_count == 0 for o in result.report.objects)
    assert sum("tokenizer's limit" in note for note in result.report.notes) == 2


def test_thirty_objects_of_one_phrase_in_chunks_with_boxes_smaller_than_a_cell(tiny_pipeline):
    boxes = [[0.02 + 0.16 * (k % 6), 0.02 + 0.19 * (k // 6), 0.14 + 0.16 * (k % 6), 0.18 + 0.19 * (k // 6)] for k in range(27)]
    boxes += [[0.0, 0.0, 0.03, 0.03], [0.97, 0.97, 1.0, 1.0], [0.5, 0.98, 0.52, 1.0]]  # a corner, the edge, under a cell
    layout = layout_data(*same_phrase_objects(boxes), background="a park")
    options = LMDOptions.reference(steps=2, max_batch=8, loss_threshold=0.0)
    # 32 px: 16x16 latents, 8x8 attention maps, so the last three boxes cover less than a cell
    result = tiny_pipeline(layout, seed=3, options=options, width=32, height=32)
    report = result.report
    assert report.prompt == "a park with 30 cats"
    for stage in report.stages:
        assert all(size <= 8 for size in stage.unet.forward_batch_sizes), stage
        assert all(size <= 8 for size in stage.unet.backward_batch_sizes), stage
    per_box = next(s for s in report.stages if s.name == "per_box")
    assert per_box.unet.forward_batch_sizes[8] >= 2 * 7  # 60 CFG rows in chunks of 8, twice
    assert len(result.masks) == 30 and all(np.asarray(m).any() for m in result.masks.values())
    for obj in report.objects:
        assert np.isfinite([obj.per_box_energy.start, obj.final_energy.start]).all(), obj.id
        assert obj.per_box_energy.start > 0
    assert torch.isfinite(result.intermediates.final_latents).all()


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "PNDMScheduler"])
def test_schedulers_with_more_calls_than_steps_are_refused(tiny_sd_path, tiny_pipeline, name):
    from grounded_sd import ModelLoadError

    # Heun takes two UNet calls per step, PNDM one more than the steps: looping over `steps` of
    # their timesteps would stop before the image is denoised
    with pytest.raises(ModelLoadError, match=f"scheduler {name} takes .* model calls for 10 steps"):
        LMDPipeline.from_pretrained(tiny_sd_path, device="cpu", scheduler=name)
    with pytest.raises(ModelLoadError, match="LMD needs one per step"):
        with_scheduler(tiny_pipeline, name, skip_prk_steps=True)(LAYOUT, seed=0, options=LMDOptions(steps=3), width=64, height=64)


def test_non_finite_latents_are_a_typed_error_not_a_black_image(tiny_sd_path):
    from grounded_sd import NonFiniteLatents

    pipe = LMDPipeline.from_pretrained(tiny_sd_path, device="cpu")
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("inf")  # a broken checkpoint, as fp16 overflow would leave it
    with pytest.raises(NonFiniteLatents, match="the per_box pass produced NaN or infinite latents in float32"):
        pipe(LAYOUT, seed=0, options=LMDOptions.fast(steps=3), width=64, height=64)


def test_sd2_shaped_unet_with_head_lists_linear_projection_and_v_prediction(tiny_pipeline):
    """SD 2.x's UNet options (heads per block as a list, linear projections, upcast attention)
    with a v-prediction scheduler: guidance reads the right head count and still works."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=[8, 2], use_linear_projection=True, upcast_attention=True, norm_num_groups=32,
    )
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(4.0)
                module.to_k.weight.mul_(4.0)
    scheduler = DDIMScheduler.from_config(tiny_pipeline.scheduler.config, prediction_type="v_prediction")
    pipe = LMDPipeline(unet, tiny_pipeline.vae, tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, scheduler)
    options = LMDOptions.reference(steps=4, loss_threshold=0.0)
    layers = ["mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert pipe.energy_threshold(LMDOptions.reference(), layers) == pytest.approx(5.0 * 2 / 8)  # 2 heads there, not 8
    result = pipe(LAYOUT, seed=5, options=options, width=64, height=64)
    assert torch.isfinite(result.intermediates.final_latents).all()
    assert all(o.per_box_energy.after_first_step < o.per_box_energy.start for o in result.report.objects)
