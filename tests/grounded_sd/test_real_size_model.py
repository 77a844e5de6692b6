"""The real-size random model (issue 24): SD 1.5's exact architecture, fingerprinted by its
parameter counts (built on the meta device: no memory, no time), and CLIP's tokenizer rebuilt
from a BPE file in CLIP's format (a small one written here, read plain and from a wheel)."""

from __future__ import annotations

import gzip
import zipfile

import pytest
import torch
from transformers import CLIPTokenizer

from grounded_sd.clip_vocab import BPE_MEMBER, ClipVocabError, clip_vocab_and_merges, read_bpe_lines, write_clip_tokenizer_files
from grounded_sd.random_model import bytes_to_unicode, text_encoder_config, unet_and_vae

# A BPE file in CLIP's format: a version line, then merges in rank order.
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


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


def _bpe_file(path, merges=MERGES):
    path.write_bytes(gzip.compress(("\n".join(["#version: 0.2", *merges]) + "\n").encode()))
    return path


def test_clip_vocab_follows_clips_order_and_tokenizes(tmp_path):
    vocab, merges = clip_vocab_and_merges(read_bpe_lines(_bpe_file(tmp_path / "bpe.txt.gz")), n_merges=len(MERGES))
    symbols = list(bytes_to_unicode().values())
    assert list(vocab)[:512] == symbols + [s + "</w>" for s in symbols]
    assert list(vocab)[512:] == ["ca", "cat</w>", "do", "dog</w>", "re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    assert list(vocab.values()) == list(range(len(vocab)))
    assert merges == MERGES


def test_clip_tokenizer_files_load_in_transformers_from_a_wheel(tmp_path):
    wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(BPE_MEMBER, _bpe_file(tmp_path / "bpe.txt.gz").read_bytes())
    with pytest.raises(ClipVocabError, match="expected 48894 merges"):
        write_clip_tokenizer_files(tmp_path / "full", wheel)  # CLIP's vocabulary needs all of CLIP's merges
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path / "tokenizer", wheel, n_merges=len(MERGES)))
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 512 + len(MERGES) + 2 and vocab["cat</w>"] == 513
    assert tokenizer("A red cat").input_ids == [vocab[t] for t in ("<|startoftext|>", "a</w>", "red</w>", "cat</w>", "<|endoftext|>")]
    assert tokenizer.model_max_length == 77


def test_a_missing_or_foreign_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(ClipVocabError, match="cannot read the CLIP vocabulary"):
        read_bpe_lines(tmp_path / "missing.txt.gz")
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("x.txt", "")
    with pytest.raises(ClipVocabError, match="does not hold open_clip/bpe_simple_vocab_16e6.txt.gz"):
        read_bpe_lines(other)
