"""Loading a SAM checkpoint: the error paths, and one real published architecture (vit_b)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry

from grounded_sd.masks import SamCheckpointError, load_sam_predictor

torch.set_num_threads(1)


def test_missing_checkpoint(tmp_path: Path):
    with pytest.raises(SamCheckpointError, match="not found"):
        load_sam_predictor(tmp_path / "sam_vit_h.pth", "vit_h")


def test_unknown_model_type(tiny_sam_checkpoint: Path):
    with pytest.raises(SamCheckpointError, match="unknown SAM model type 'vit_x'"):
        load_sam_predictor(tiny_sam_checkpoint, "vit_x")


def test_file_that_is_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "sam.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(SamCheckpointError, match="cannot read SAM checkpoint"):
        load_sam_predictor(path, "vit_b")


def test_checkpoint_of_another_architecture(tiny_sam_checkpoint: Path):
    with pytest.raises(SamCheckpointError, match="does not fit model type vit_b.*shape mismatches"):
        load_sam_predictor(tiny_sam_checkpoint, "vit_b")


def test_vit_b_checkpoint_given_as_vit_h_names_its_type(tmp_path: Path):
    with torch.device("meta"):
        skeleton = sam_model_registry["vit_b"]()
    # only the shapes matter for the check, which runs before any full model is built
    path = tmp_path / "sam_vit_b.pth"
    torch.save({k: torch.zeros(1).expand(v.shape) for k, v in skeleton.state_dict().items()}, path)
    with pytest.raises(SamCheckpointError, match="looks like a vit_b checkpoint"):
        load_sam_predictor(path, "vit_h")


def test_real_vit_b_checkpoint_loads(tmp_path: Path):
    """The published vit_b architecture, random weights saved like the real checkpoint (~3 s on CPU; a forward pass at 1024 px is too slow here)."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    predictor = load_sam_predictor(path, "vit_b", device="cpu")
    assert isinstance(predictor, SamPredictor)
    loaded = predictor.model.state_dict()
    assert torch.equal(loaded["image_encoder.pos_embed"], sam.state_dict()["image_encoder.pos_embed"])

    assert predictor.model.image_encoder.img_size == 1024 and not predictor.model.training
