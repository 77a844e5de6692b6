"""A tiny segment-anything model built from segment-anything's own classes, random weights.

The published builders (``sam_model_registry``) make full-size models; this one has a
64 px input, an 8x8 image embedding and ~54k parameters, and runs through the real
``SamPredictor`` (its resize transform reads ``image_encoder.img_size``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

TINY_SAM_IMAGE_SIZE = 64


def build_tiny_sam(seed: int = 0) -> Sam:
    """A random tiny SAM: same architecture family as the published ones, toy sizes."""
    torch.manual_seed(seed)
    dim, patch = 32, 8
    grid = TINY_SAM_IMAGE_SIZE // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=TINY_SAM_IMAGE_SIZE,
            patch_size=patch,
            embed_dim=32,
            depth=1,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(TINY_SAM_IMAGE_SIZE, TINY_SAM_IMAGE_SIZE),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def set_predicted_ious(sam: Sam, ious: tuple[float, float, float]) -> None:
    """Steer SAM's quality head: the three multimask candidates report exactly ``ious``.

    The head's last layer gets zero weights and the wanted values as bias (output 0 is the
    single-mask output, unused with ``multimask_output=True``).
    """
    last = sam.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, *ious]))


@pytest.fixture
def tiny_sam() -> Sam:
    return build_tiny_sam()


@pytest.fixture
def tiny_sam_predictor(tiny_sam: Sam) -> SamPredictor:
    return SamPredictor(tiny_sam)


@pytest.fixture
def tiny_sam_checkpoint(tmp_path: Path, tiny_sam: Sam) -> Path:
    """The tiny SAM's state dict saved like a published checkpoint."""
    path = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam.state_dict(), path)
    return path
