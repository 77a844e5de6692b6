"""Random-weight conditioning files, written like the real ones (tests and ``lmd bench``).

No weights can be downloaded on a test machine, so the ELLA and GlueNet paths are exercised on
tiny models built from configs: a T5 encoder and an XLM-RoBERTa (transformers), each with a
word-level tokenizer built with the ``tokenizers`` library and saved beside it, an ELLA
connector saved as ``.safetensors`` and a GlueNet saved as a ``torch.save``d state dict, the
formats of the released files. Everything then loads through the real loading code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grounded_sd.conditioning.ella import ELLA, ELLAConfig
from grounded_sd.conditioning.gluenet import GlueNet, GlueNetConfig
from grounded_sd.random_model import WORDS

MULTILINGUAL_WORDS = (
    "un une le la les chat chats chien rouge bleu sur canapé gauche droite gatto rosso cane sul divano "
    "gato perro rojo sofá en el 三 只 猫 狗 在 沙 发 上 红 色 赤 い ね こ が ソ フ ァ の に る"
).split()


def _word_tokenizer(
    directory: Path, *, bos: str | None, eos: str, pad: str, unk: str, max_length: int, words: list[str] | None = None
):
    """A lower-casing word-level tokenizer (CJK characters split one per token) over ``words``
    (default :data:`WORDS` and :data:`MULTILINGUAL_WORDS`), saved as a fast tokenizer in ``directory``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [pad, eos, unk] + ([bos] if bos else [])
    vocab: dict[str, int] = {}
    for token in specials + (list(words) if words else list(WORDS) + list(MULTILINGUAL_WORDS)):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        template = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    else:
        template = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    tokenizer.post_processor = template
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, eos_token=eos, unk_token=unk, bos_token=bos, model_max_length=max_length
    )
    fast.save_pretrained(directory)
    return fast, vocab


def build_random_t5(path: Path | str, *, d_model: int = 32, seed: int = 0, words: list[str] | None = None) -> Path:
    """A tiny ``T5EncoderModel`` and its tokenizer in ``path`` (loads like google/flan-t5-xl);
    ``words``: the tokenizer's vocabulary (default the tests' words), unknown words map to ``<unk>``."""
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    _, vocab = _word_tokenizer(path, bos=None, eos="</s>", pad="<pad>", unk="<unk>", max_length=512, words=words)
    config = T5Config(
        vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"],
    )
    T5EncoderModel(config).save_pretrained(path)
    return path


def build_random_xlmr(path: Path | str, *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny ``XLMRobertaModel`` and its tokenizer in ``path`` (loads like xlm-roberta-large)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    path = Path(path)
    torch.manual_seed(seed)
    _, vocab = _word_tokenizer(path, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", max_length=512)
    config = XLMRobertaConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
        max_position_embeddings=80, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
    )
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


def tiny_ella_config(width: int, text_dim: int) -> ELLAConfig:
    return ELLAConfig(time_channels=32, time_embed_dim=width, width=width, text_dim=text_dim, num_latents=8, layers=2, heads=8)


def tiny_gluenet_config(in_dim: int, out_dim: int) -> GlueNetConfig:
    return GlueNetConfig(in_dim=in_dim, out_dim=out_dim, mult=2, depth=2)


def write_random_ella(path: Path | str, config: ELLAConfig, *, seed: int = 0) -> Path:
    """An ELLA connector with random weights as ``.safetensors`` (the released format). The
    time-modulation layers, zero in a fresh module, get random weights as a trained file has,
    scaled up so that the timestep visibly changes the output."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    module = ELLA(config)
    with torch.no_grad():
        for name, child in module.named_modules():
            if name.endswith((".ln_1.linear", ".ln_2.linear", ".ln_ff.linear")):
                child.reset_parameters()
        for name, parameter in module.named_parameters():
            if "ln_" in name or "time_aware" in name:
                parameter.mul_(4.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in module.state_dict().items()}, str(path))
    return path


def write_random_gluenet(path: Path | str, config: GlueNetConfig, *, seed: int = 0) -> Path:
    """A GlueNet with random weights as a ``torch.save``d state dict (the released format)."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(GlueNet(config).state_dict(), path)
    return path
