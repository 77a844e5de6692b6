"""Tiny random decoder-only LLMs saved like real ones (Qwen2 or Llama config), with a
byte-level BPE tokenizer (``tokenizer.json``: a fast tokenizer with character offsets, as
Qwen's and Llama's are) trained here on a few words. ``build_tiny_llm(path)`` writes a
directory that ``AutoConfig``/``AutoModel``/``AutoTokenizer.from_pretrained`` load offline.
(A tiny T5: ``grounded_sd.conditioning.random_encoders.build_random_t5``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grounded_sd.random_model import WORDS

_CORPUS = list(WORDS) + "square circle triangle shape shapes background describe image color size texture quantity spatial objects".split()


def _tokenizer(specials: dict[str, str], template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([" ".join(_CORPUS)] * 3 + [f" {w}" for w in _CORPUS], trainer=trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials.values() if s in template]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def build_tiny_llm(path: Path | str, arch: str = "qwen2", hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """A decoder-only LLM: ``qwen2`` (no BOS, like Qwen) or ``llama`` (a BOS before each text)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    torch.manual_seed(seed)
    if arch == "qwen2":
        tokenizer = _tokenizer({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}, None)
        config_cls = Qwen2Config
    else:
        tokenizer = _tokenizer({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, "<s> $A")
        config_cls = LlamaConfig
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llama"), arch="llama", hidden=24, layers=3)
