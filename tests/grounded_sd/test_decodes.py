"""The masks stage decodes per-box images only for a reader (SAM, or a caller that asks), in
chunks of at most ``max_batch``: VAE decodes are counted by a forward hook on the real
diffusers decoder of the tiny random SD (issue 24)."""

from __future__ import annotations

import numpy as np
import pytest

from grounded_sd import LMDOptions, LMDPipeline
from tests.support.builders import box_object, park_layout_data

SIZE = 64
LAYOUT = park_layout_data(box_object("ball", "a blue ball", (0.6, 0.05, 0.85, 0.3)))  # three objects


@pytest.fixture
def decodes(tiny_pipeline):
    """The batch size of every VAE decoder call made while the test runs."""
    sizes: list[int] = []
    handle = tiny_pipeline.vae.decoder.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    yield sizes
    handle.remove()


def _options(**overrides) -> LMDOptions:
    return LMDOptions.fast(**{"steps": 3, **overrides})


def test_attention_masks_decode_nothing_but_the_final_image(tiny_pipeline, decodes):
    result = tiny_pipeline(LAYOUT, seed=3, width=SIZE, height=SIZE, options=_options())
    assert decodes == [1]  # the final image only
    assert result.intermediates.per_box_images == {}
    assert all(o.mask_source == "attention" for o in result.report.objects)
    assert any("made from its attention (nothing decoded)" in note for note in result.report.notes), result.report.notes

    decodes.clear()
    asked = tiny_pipeline(LAYOUT, seed=3, width=SIZE, height=SIZE, options=_options(), per_box_images=True)
    assert decodes == [1, 1, 1, 1]  # one per object (no max_batch: one at a time), then the final image
    assert sorted(asked.intermediates.per_box_images) == ["ball", "cat", "dog"]
    for object_id, mask in result.masks.items():  # the pixels are not read for attention masks
        assert np.array_equal(np.asarray(mask), np.asarray(asked.masks[object_id]))
    assert np.array_equal(np.asarray(result.image), np.asarray(asked.image))


def test_requested_per_box_images_decode_in_chunks_of_max_batch(tiny_pipeline, decodes):
    result = tiny_pipeline(LAYOUT, seed=3, width=SIZE, height=SIZE, options=_options(max_batch=2), per_box_images=True)
    assert decodes == [2, 1, 1]
    assert all(image.size == (SIZE, SIZE) for image in result.intermediates.per_box_images.values())


def test_sam_masks_decode_every_per_box_image(tiny_pipeline, tiny_sam_predictor, decodes):
    pipe = LMDPipeline(
        tiny_pipeline.unet, tiny_pipeline.vae, tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, tiny_pipeline.scheduler,
        sam_predictor=tiny_sam_predictor,
    )
    result = pipe(LAYOUT, seed=3, width=SIZE, height=SIZE, options=_options())
    assert decodes == [1, 1, 1, 1]
    assert all("SAM not configured" not in o.mask_detail for o in result.report.objects)
    assert result.intermediates.per_box_images == {}  # read by SAM, not kept


def test_attention_masks_need_no_pixels_only_the_size(tiny_sam_predictor):
    from grounded_sd.errors import MaskInputError
    from grounded_sd.masks import object_mask

    attention = np.zeros((8, 8), dtype=np.float32)
    attention[2:5, 3:6] = 1.0
    box = (0.25, 0.2, 0.8, 0.7)
    with_pixels = object_mask(np.zeros((64, 48, 3), dtype=np.uint8), attention, box, predictor=None)
    without = object_mask(None, attention, box, predictor=None, size=(64, 48))
    assert without.source == "attention" and np.array_equal(without.mask, with_pixels.mask) and without.mask.shape == (64, 48)
    with pytest.raises(MaskInputError, match="SAM refines masks on the per-box image"):
        object_mask(None, attention, box, predictor=tiny_sam_predictor, size=(64, 48))
    with pytest.raises(MaskInputError, match="size must be"):
        object_mask(None, attention, box, predictor=None)
