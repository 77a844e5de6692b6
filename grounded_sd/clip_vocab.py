"""CLIP's exact BPE vocabulary as a ``transformers.CLIPTokenizer`` (vocab.json + merges.txt).

No tokenizer can be downloaded from the hub on a benchmark machine, but the vocabulary of
OpenAI's CLIP (the one SD 1.x's tokenizer uses) ships as ``open_clip/bpe_simple_vocab_16e6.txt.gz``
inside the ``open-clip-torch`` wheel, which a package registry serves::

    pip download --no-deps open-clip-torch -d /tmp/wheels

That file is CLIP's original format: a version line, then merges, one "left right" pair a line.
CLIP's own tokenizer (``simple_tokenizer.py`` of openai/CLIP) builds its vocabulary from it in a
fixed order: the 256 byte characters, the same with ``</w>``, the first 48,894 merges joined,
then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens, the ids SD 1.x's
``tokenizer/vocab.json`` holds. :func:`clip_vocab_and_merges` rebuilds that; :func:`write_clip_tokenizer_files`
writes it as the files ``CLIPTokenizer.from_pretrained`` reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zipfile
from pathlib import Path

from grounded_sd.random_model import bytes_to_unicode

CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges (CLIP reads lines 1 .. 49152-256-2 of the file)
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


class ClipVocabError(ValueError):
    """The CLIP vocabulary file cannot be found or read; the message says where it looked."""


def read_bpe_lines(source: Path | str | None = None) -> list[str]:
    """The lines of CLIP's ``bpe_simple_vocab_16e6.txt.gz`` from ``source``: that file, an
    ``open-clip-torch`` wheel holding it, or (None) the installed ``open_clip`` package's copy
    (found without importing the package)."""
    if source is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ClipVocabError(
                "no CLIP vocabulary given and open_clip is not installed: pass the open-clip-torch wheel "
                "(pip download --no-deps open-clip-torch) or its bpe_simple_vocab_16e6.txt.gz"
            )
        source = Path(next(iter(spec.submodule_search_locations))) / Path(BPE_MEMBER).name
    path = Path(source)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as wheel:
                if BPE_MEMBER not in wheel.namelist():
                    raise ClipVocabError(f"{path} does not hold {BPE_MEMBER}")
                data = gzip.decompress(wheel.read(BPE_MEMBER))
        else:
            data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ClipVocabError(f"cannot read the CLIP vocabulary {path}: {exc}") from exc
    return data.decode("utf-8").split("\n")


def clip_vocab_and_merges(lines: list[str], n_merges: int = CLIP_MERGES) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and merges from the bpe file's ``lines`` (first line: version)."""
    pairs = [line for line in lines[1:] if line.strip()][:n_merges]
    if len(pairs) < n_merges or any(len(pair.split()) != 2 for pair in pairs):
        raise ClipVocabError(f"expected {n_merges} merges of two symbols after the version line, got {len(pairs)}")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair.split()) for pair in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ClipVocabError("the merges produce a token twice; this is not CLIP's vocabulary file")
    return vocab, pairs


def write_clip_tokenizer_files(
    directory: Path | str, source: Path | str | None = None, *, max_length: int = 77, n_merges: int = CLIP_MERGES
) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of CLIP's tokenizer to ``directory``
    (``CLIPTokenizer.from_pretrained(directory)`` loads them)."""
    vocab, merges = clip_vocab_and_merges(read_bpe_lines(source), n_merges)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True})
    )
    return directory
