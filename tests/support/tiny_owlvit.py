"""A tiny random OWL-ViT detector saved like a hub checkpoint (model + processor + CLIP tokenizer).

Loaded through the real ``from_pretrained`` code by the evaluation harness. It detects
garbage; tests assert the harness's structure, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_OWLVIT_IMAGE_SIZE = 32
MAX_QUERY_TOKENS = 32  # unknown words split into characters: "a photo of a purple backpack" fits


def save_tiny_owlvit(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from tests.support.tiny_sd import tiny_vocab_and_merges  # the tiny SD's CLIP vocabulary, reused

    vocab, merges = tiny_vocab_and_merges()
    pairs = [tuple(m.split(" ")) for m in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=MAX_QUERY_TOKENS)
    size = {"height": TINY_OWLVIT_IMAGE_SIZE, "width": TINY_OWLVIT_IMAGE_SIZE}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tokenizer)
    config = OwlViTConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_QUERY_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            image_size=TINY_OWLVIT_IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = OwlViTForObjectDetection(config).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_owlvit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_owlvit(tmp_path_factory.mktemp("tiny_owlvit"))
