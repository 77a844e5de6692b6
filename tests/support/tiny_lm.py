"""Tiny random decoder-only LMs saved like real ones: a Qwen2 (or Llama) causal LM and a
byte-level BPE tokenizer (``tokenizer.json``, a fast tokenizer with character offsets, as
Qwen's and Llama's are), trained here with the ``tokenizers`` library (no downloads), so
``AutoConfig``/``AutoModel``/``AutoTokenizer.from_pretrained`` load the directory offline.

Two kinds share one tokenizer trainer and one config:

- ``build_tiny_lm``: a chat model for the local planner (``LocalLLMClient``), with a chat
  template and a tokenizer trained on the planner's own template. Its weights are random:
  only constrained decoding makes its answers layouts.
- ``build_tiny_llm``: a text encoder for connector training and ``connector:`` conditionings,
  ``qwen2`` (no BOS) or ``llama`` (a BOS before each text), trained on a few words.

(A tiny T5: ``grounded_sd.conditioning.random_encoders.build_random_t5``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Trained on the planner's own template, so JSON punctuation and common words are single tokens, like a
# real BPE: a random model then spends fewer tokens per answer (the tests stay fast).
CHAT_VOCAB_SIZE = 1500


def train_bpe(lines: list[str], vocab_size: int, special_tokens: list[str], *, use_regex: bool = True):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``lines``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def causal_lm_config(config_cls, tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int, max_positions: int):
    """A small decoder config sized to ``tokenizer`` (tied embeddings, its special tokens)."""
    return config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def build_tiny_lm(path: Path | str, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write the tiny random chat model and its tokenizer to ``path``; return ``path``."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from layout_planner.template import load_template

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe(load_template().text.splitlines(), CHAT_VOCAB_SIZE, CHAT_SPECIAL_TOKENS, use_regex=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    config = causal_lm_config(Qwen2Config, fast, hidden=hidden, layers=layers, heads=2, kv_heads=1, max_positions=8192)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _encoder_tokenizer(specials: dict[str, str], template: str | None, words: list[str] | None = None):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from grounded_sd.random_model import WORDS

    corpus = list(words) if words else list(WORDS) + (
        "square circle triangle shape shapes background describe image color size texture quantity spatial objects".split()
    )
    # 400 merges and bytes cover the default words; a given vocabulary gets room for every word to become one token
    vocab_size = 400 if not words else 300 + sum(len(w) for w in corpus)
    lines = [" ".join(corpus)] * 3 + [f" {w}" for w in corpus] + (list(corpus) if words else [])  # given words: also text-initial
    tok = train_bpe(lines, vocab_size, list(specials.values()))
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials.values() if s in template]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def build_tiny_llm(
    path: Path | str, arch: str = "qwen2", hidden: int = 32, layers: int = 4, seed: int = 0, words: list[str] | None = None
) -> Path:
    """A decoder-only text encoder: ``qwen2`` (no BOS, like Qwen) or ``llama`` (a BOS before each text);
    ``words``: what its BPE is trained on (default a few test words; each given word ends up one token)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    torch.manual_seed(seed)
    if arch == "qwen2":
        tokenizer = _encoder_tokenizer({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}, None, words)
        config_cls = Qwen2Config
    else:
        tokenizer = _encoder_tokenizer({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, "<s> $A", words)
        config_cls = LlamaConfig
    config = causal_lm_config(config_cls, tokenizer, hidden=hidden, layers=layers, heads=4, kv_heads=2, max_positions=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local planner's chat model."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2-style text encoder for connectors."""
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style text encoder (BOS first) for connectors."""
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llama"), arch="llama", hidden=24, layers=3)
