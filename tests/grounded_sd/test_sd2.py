"""SD 2.x through every stage, on a tiny random model of SD 2's topology: a head count per block
(2 and 4 heads among the guided layers), linear projections, a gelu (OpenCLIP-like) text encoder
and a v-prediction scheduler. Per-box pass, guidance backward, masks, composition and the final
pass all run, and the v-prediction is what the loop reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_sd import LMDOptions, LMDPipeline
from grounded_sd.attention import cross_attention_names
from grounded_sd.random_model import build_random_sd
from tests.support.builders import box_object, park_layout_data

SIZE = 64
LAYOUT = park_layout_data(box_object("ball", "a blue ball", (0.6, 0.05, 0.85, 0.3)))


@pytest.fixture(scope="module")
def sd2_path(tmp_path_factory):
    return build_random_sd(tmp_path_factory.mktemp("tiny_sd2"), shape="tiny_sd2")


@pytest.fixture(scope="module")
def sd2(sd2_path):
    torch.set_num_threads(1)
    return LMDPipeline.from_pretrained(sd2_path, device="cpu")


def up_layers(pipe) -> list[str]:
    """Every up block's cross-attention: 4 heads at 1/4 of the latent, 2 heads at 1/2."""
    return [name for name in cross_attention_names(pipe.unet) if name.startswith("up_blocks")]


def render(pipe, **options):
    return pipe(LAYOUT, seed=3, width=SIZE, height=SIZE, options=LMDOptions.reference(steps=6, loss_threshold=0.0, **options))


def test_the_model_has_sd2s_topology(sd2):
    config = sd2.unet.config
    assert tuple(config.attention_head_dim) == (2, 4) and config.use_linear_projection
    assert sd2.text_encoder.config.hidden_act == "gelu"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    modules = dict(sd2.unet.named_modules())
    assert sorted({modules[name].heads for name in up_layers(sd2)}) == [2, 4]


def test_every_stage_runs_with_guidance_over_layers_of_different_head_counts(sd2):
    layers = up_layers(sd2)
    result = render(sd2, attention_layers=layers)
    report, inter = result.report, result.intermediates
    assert [s.name for s in report.stages] == ["per_box", "masks", "final"]
    assert report.attention_layers == layers
    for obj in report.objects:  # the backward through the UNet moved each object's latent down its energy
        assert obj.per_box_energy.iterations > 0 and obj.per_box_energy.after_first_step < obj.per_box_energy.start, obj.id
        assert obj.final_energy.start is not None
        assert obj.mask_source in ("attention", "box") and 0 < obj.mask_area < 1
    assert report.unet_total.backward > 0
    assert set(result.masks) == {"cat", "dog", "ball"}
    assert (inter.owner > 0).any() and inter.composed is not None
    image = np.asarray(result.image, dtype=np.int16)
    assert image.std() > 1  # decoded, not a flat image
    # the energy threshold follows this UNet's heads (mean over the guided layers), not SD 1.5's 8
    modules = dict(sd2.unet.named_modules())
    mean_heads = sum(modules[name].heads for name in layers) / len(layers)
    options = LMDOptions.reference()
    assert sd2.energy_threshold(options, layers) == pytest.approx(options.loss_threshold * mean_heads / 8)


def test_the_default_guided_layers_and_the_plain_baseline_run(sd2):
    grounded = render(sd2)
    plain = sd2(LAYOUT, seed=3, width=SIZE, height=SIZE, variant="sd", options=LMDOptions.reference(steps=6))
    assert grounded.report.attention_layers and plain.report.stages[0].name == "sd"
    assert not np.array_equal(np.asarray(grounded.image), np.asarray(plain.image))


def test_the_loop_reads_v_prediction_from_the_scheduler(sd2_path):
    """The same weights read as epsilon-prediction give another image: the model's own scheduler decides."""
    v = LMDPipeline.from_pretrained(sd2_path, device="cpu")
    eps = LMDPipeline.from_pretrained(sd2_path, device="cpu")
    eps.scheduler = type(eps.scheduler).from_config(eps.scheduler.config, prediction_type="epsilon")
    first, second = (np.asarray(render(p).image, dtype=np.int16) for p in (v, eps))
    assert np.abs(first - second).max() > 10
