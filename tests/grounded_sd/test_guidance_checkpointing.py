"""``guidance_checkpointing``: guidance's forwards keep only each UNet block's inputs and recompute
the blocks in the backward (issue 22's memory option), with the same result as without."""

from __future__ import annotations

import contextlib

import pytest
import torch

from grounded_sd import LMDOptions, LMDPipeline
from tests.support.builders import box_object, park_layout_data

LAYOUT = park_layout_data(box_object("ball", "a blue ball", (0.55, 0.1, 0.9, 0.45)), box_object("kite", "a red kite", (0.05, 0.1, 0.4, 0.5)))


@contextlib.contextmanager
def saved_bytes() -> list[int]:
    """Bytes autograd saves for the backward outside checkpointed regions (checkpoint's own
    hooks are innermost, so what it recomputes is not seen here), weights excluded."""
    counted = [0]

    def pack(tensor: torch.Tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            counted[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counted


def run(pipe: LMDPipeline, variant: str, checkpointing: bool):
    options = LMDOptions.fast(steps=3, guidance_checkpointing=checkpointing)
    with saved_bytes() as counted:
        result = pipe(LAYOUT, seed=3, options=options, variant=variant, width=64, height=64)
    return result, counted[0]


@pytest.mark.parametrize("variant", ["lmd", "lmd_plus"])
def test_checkpointed_guidance_gives_the_same_latents_with_fewer_saved_activations(variant, tiny_sd_path, tiny_gligen_sd_path):
    pipe = LMDPipeline.from_pretrained(tiny_gligen_sd_path if variant == "lmd_plus" else tiny_sd_path, device="cpu")
    plain, plain_bytes = run(pipe, variant, checkpointing=False)
    checkpointed, checkpointed_bytes = run(pipe, variant, checkpointing=True)
    assert not pipe.unet.is_gradient_checkpointing  # switched off again after the call

    assert plain.report.unet_total.backward_samples > 0  # guidance ran (and its backward)
    energies = [(o.per_box_energy.start, o.final_energy.start) for o in plain.report.objects]
    assert energies == [(o.per_box_energy.start, o.final_energy.start) for o in checkpointed.report.objects]
    torch.testing.assert_close(checkpointed.intermediates.final_latents, plain.intermediates.final_latents, rtol=1e-5, atol=1e-6)
    assert checkpointed_bytes < plain_bytes / 2, (checkpointed_bytes, plain_bytes)


def test_the_setting_turns_it_on_for_every_render_unless_overridden(monkeypatch):
    from lmd import wiring
    from lmd.settings import Settings

    monkeypatch.setenv("LMD_GUIDANCE_CHECKPOINTING", "true")
    assert wiring.render_options(Settings(), "fast").guidance_checkpointing
    assert not wiring.render_options(Settings(), "fast", guidance_checkpointing=False).guidance_checkpointing
    monkeypatch.delenv("LMD_GUIDANCE_CHECKPOINTING")
    assert not wiring.render_options(Settings(), "reference").guidance_checkpointing
