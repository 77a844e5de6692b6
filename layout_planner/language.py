"""The language of the user's prompt (ISO 639-1), for conditionings that denoise with the
prompt in its own language (GlueGen) while the layout's phrases stay English.

Two steps, both offline: the writing system first (kana means Japanese; Han characters without
kana mean Chinese; Hangul Korean), since statistical detectors are unreliable on a few CJK
characters; otherwise py3langid (a maintained fork of langid.py: a naive Bayes model over byte
n-grams for 97 languages, shipped inside the package, loaded on first use, ~5 MB).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
LANGUAGE_CODE = re.compile(r"^[a-z]{2}$")


@lru_cache(maxsize=1)
def _identifier():
    import py3langid

    return py3langid


def normalize_language(code: str) -> str:
    """``"FR"``, ``"fr-FR"``, ``"zh-CN"`` -> ``"fr"``, ``"zh"``; anything else is a ValueError."""
    base = code.strip().lower().replace("_", "-").split("-")[0]
    if not LANGUAGE_CODE.match(base):
        raise ValueError(f"language must be an ISO 639-1 code such as 'fr' or 'zh', got {code[:40]!r}")
    return base


def detect_language(text: str) -> str:
    """Best guess of ``text``'s language as an ISO 639-1 code (``"en"`` for an empty text)."""
    text = unicodedata.normalize("NFKC", text or "").strip()
    if not text:
        return "en"
    if _KANA.search(text):
        return "ja"
    if _HAN.search(text):
        return "zh"
    if _HANGUL.search(text):
        return "ko"
    code, _score = _identifier().classify(text)
    return normalize_language(code)
