"""Live previews of stage 2: the latent-to-RGB map, what each pass shows, and that they change nothing."""

from __future__ import annotations

import numpy as np
import torch

from grounded_sd import LMDOptions
from grounded_sd.previews import GREY, LATENT_TO_RGB, PREVIEW_SIDE, latent_rgb, per_box_preview, preview_interval

LAYOUT = {
    "objects": [
        {"id": "cat", "phrase": "a red cat", "box": [0.0, 0.0, 0.5, 0.5]},
        {"id": "dog", "phrase": "a dog", "box": [0.5, 0.5, 1.0, 1.0]},
    ],
    "background": "a park",
}


def test_latent_rgb_is_the_fixed_linear_map():
    latent = torch.zeros(4, 2, 2)
    latent[0] = 1.0
    rgb = latent_rgb(latent)
    expected = [round((v + 1) * 127.5) for v in LATENT_TO_RGB[0]]
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == expected
    assert latent_rgb(torch.zeros(4, 1, 1))[0, 0].tolist() == [128, 128, 128]


def test_per_box_preview_shows_each_object_in_its_own_box():
    latents = torch.zeros(2, 4, 8, 8)
    latents[0, 0] = 1.0   # object 0: reddish everywhere, shown only in its box (top left)
    latents[1, 3] = -1.0  # object 1: another colour, bottom right
    image = np.asarray(per_box_preview(latents, [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)]))
    assert image.shape == (PREVIEW_SIDE, PREVIEW_SIDE, 3)
    q = PREVIEW_SIDE // 4
    assert image[q, q].tolist() == latent_rgb(latents[0])[0, 0].tolist()
    assert image[3 * q, 3 * q].tolist() == latent_rgb(latents[1])[0, 0].tolist()
    assert image[q, 3 * q].tolist() == [GREY] * 3  # outside every box


def test_interval():
    assert preview_interval(4) == 1 and preview_interval(50) == 6


def test_previews_of_every_pass_and_the_same_image(tiny_pipeline):
    options = LMDOptions.fast(steps=4)  # its per-box pass stops after 2 steps
    seen = []
    with_previews = tiny_pipeline(LAYOUT, seed=5, width=64, height=64, options=options,
                                  preview=lambda stage, step, total, image: seen.append((stage, step, total, image)))
    without = tiny_pipeline(LAYOUT, seed=5, width=64, height=64, options=options)
    assert np.array_equal(np.asarray(with_previews.image), np.asarray(without.image))

    stages = [s for s, *_ in seen]
    assert stages == ["per_box"] * 2 + ["compose"] + ["final"] * 4
    assert [step for s, step, *_ in seen if s == "final"] == [1, 2, 3, 4]
    assert all(image.size == (PREVIEW_SIDE, PREVIEW_SIDE) and image.mode == "RGB" for *_, image in seen)
    per_box = np.asarray(seen[1][3])
    assert per_box[PREVIEW_SIDE // 4, 3 * PREVIEW_SIDE // 4].tolist() == [GREY] * 3  # no box there
    assert not (per_box[PREVIEW_SIDE // 4, PREVIEW_SIDE // 4] == GREY).all()
    final = np.asarray(seen[-1][3])
    assert not (final == GREY).all(axis=-1).all()

    plain = []
    tiny_pipeline(LAYOUT, seed=5, width=64, height=64, options=options, variant="sd",
                  preview=lambda stage, step, total, image: plain.append(stage))
    assert plain == ["sd"] * 4
