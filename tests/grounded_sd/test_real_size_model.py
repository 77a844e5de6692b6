"""The real-size random model (issue 24): SD 1.5's exact architecture, fingerprinted by its
parameter counts (built on the meta device: no memory, no time), and CLIP's tokenizer rebuilt
from a BPE file in CLIP's format (a synthetic one of CLIP's size written here, read plain and
from a wheel)."""

from __future__ import annotations

import gzip
import zipfile

import pytest
import torch
from transformers import CLIPTokenizer

from grounded_sd.clip_vocab import (
    VOCAB_SIZE,
    WHEEL_MEMBER,
    ClipVocabularyMissing,
    byte_symbols,
    clip_vocab_and_merges,
    write_clip_tokenizer_files,
)
from grounded_sd.random_model import text_encoder_config, unet_and_vae

WORD_MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_shape_is_sd15s_architecture():
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet, vae, hidden = unet_and_vae("sd15", gligen=False)
        gligen_unet, _, _ = unet_and_vae("sd15", gligen=True)
        text = CLIPTextModel(text_encoder_config("sd15", {f"t{i}": i for i in range(49406)} | {"<|startoftext|>": 49406, "<|endoftext|>": 49407}, hidden))
    # SD 1.5's published component sizes (stable-diffusion-v1-5: unet, vae, text_encoder)
    assert _count(unet) == 859_520_964
    assert _count(vae) == 83_653_863
    assert _count(text) == 123_060_480
    assert _count(gligen_unet) > _count(unet) and gligen_unet.config.attention_type == "gated"
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64


def _merges() -> list[str]:
    """CLIP's number of merges: a few that make words, then pairs of byte symbols."""
    merges, made = list(WORD_MERGES), {"".join(m.split()) for m in WORD_MERGES}
    symbols = byte_symbols()
    for left in symbols:
        for right in symbols:
            if len(merges) == VOCAB_SIZE - 2 * 256 - 2:
                return merges
            if left + right not in made:
                merges.append(f"{left} {right}")
                made.add(left + right)
    raise AssertionError("not enough pairs")


def _bpe_bytes() -> bytes:
    return gzip.compress(("\n".join(["#version: 0.2", *_merges()]) + "\n").encode("utf-8"))


def test_clip_vocab_follows_clips_order(tmp_path):
    (tmp_path / "bpe.txt.gz").write_bytes(_bpe_bytes())
    vocab, merges = clip_vocab_and_merges(tmp_path / "bpe.txt.gz")
    symbols = byte_symbols()
    tokens = list(vocab)
    assert len(tokens) == VOCAB_SIZE and list(vocab.values()) == list(range(VOCAB_SIZE))
    assert tokens[:512] == symbols + [s + "</w>" for s in symbols]
    assert tokens[512:518] == ["ca", "cat</w>", "do", "dog</w>", "re", "red</w>"]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert merges[:6] == WORD_MERGES


def test_clip_tokenizer_files_from_a_wheel_load_in_transformers(tmp_path):
    wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(WHEEL_MEMBER, _bpe_bytes())
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path / "tokenizer", wheel))
    vocab = tokenizer.get_vocab()
    assert len(vocab) == VOCAB_SIZE and vocab["cat</w>"] == 513 and tokenizer.model_max_length == 77
    assert tokenizer("A red cat").input_ids == [vocab[t] for t in ("<|startoftext|>", "a</w>", "red</w>", "cat</w>", "<|endoftext|>")]


def test_a_wheel_without_the_vocabulary_is_a_clear_error(tmp_path):
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("x.txt", "")
    with pytest.raises(ClipVocabularyMissing, match="does not hold open_clip/bpe_simple_vocab_16e6.txt.gz"):
        clip_vocab_and_merges(other)
