"""CLIP's exact BPE tokenizer files, made from the vocabulary that ships in ``open-clip-torch``.

The hub's ``tokenizer/`` folders cannot be downloaded on every machine, but the same BPE
vocabulary (``bpe_simple_vocab_16e6.txt.gz``, OpenAI's CLIP) is inside the ``open-clip-torch``
wheel on PyPI. ``write_clip_tokenizer_files`` turns it into the ``vocab.json`` and
``merges.txt`` that ``transformers.CLIPTokenizer`` reads: 49,408 tokens in OpenAI's order
(256 byte symbols, the same with ``</w>``, 48,894 merges, then the two special tokens).
The BPE file may also be read straight from the wheel (``pip download --no-deps open-clip-torch``),
without installing it.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

VOCAB_SIZE = 49408
_MERGES = VOCAB_SIZE - 2 * 256 - 2
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


class ClipVocabularyMissing(FileNotFoundError):
    """open-clip-torch's BPE file is not installed and no file was given."""


def find_open_clip_bpe() -> Path:
    """The BPE file of an installed ``open-clip-torch`` (found without importing it: it imports torch)."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ClipVocabularyMissing(
            "CLIP's vocabulary comes from the open-clip-torch package: pip install open-clip-torch --no-deps"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ClipVocabularyMissing(f"open-clip-torch is installed but has no {path.name}")
    return path


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def read_bpe_text(bpe_file: Path | str) -> str:
    """The BPE file's text, from the file itself or from an open-clip-torch wheel that holds it."""
    path = Path(bpe_file)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise ClipVocabularyMissing(f"{path} does not hold {WHEEL_MEMBER}")
            return gzip.decompress(wheel.read(WHEEL_MEMBER)).decode("utf-8")
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def clip_vocab_and_merges(bpe_file: Path | str) -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token -> id) and merge list of OpenAI's CLIP tokenizer (``bpe_file``: the
    BPE file or an open-clip-torch wheel)."""
    lines = read_bpe_text(bpe_file).split("\n")
    merges = lines[1 : 1 + _MERGES]  # line 0 is a version header
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_file} is not CLIP's BPE vocabulary ({len(vocab)} tokens, expected {VOCAB_SIZE})")
    return vocab, merges


def write_clip_tokenizer_files(directory: Path | str, bpe_file: Path | str | None = None) -> Path:
    """Write CLIPTokenizer's files (vocab.json, merges.txt, tokenizer_config.json) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_file or find_open_clip_bpe())
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
