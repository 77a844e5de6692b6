"""The prompt's language, for GlueNet's per-language checkpoints."""

import pytest

from layout_planner.language import detect_language, normalize_language


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("three cats on a red sofa, a lamp on the left", "en"),
        ("trois chats sur un canapé rouge, une lampe à gauche", "fr"),
        ("tre gatti su un divano rosso, una lampada a sinistra", "it"),
        ("tres gatos en un sofá rojo, una lámpara a la izquierda", "es"),
        ("沙发上有三只猫", "zh"),
        ("猫", "zh"),  # one character: the writing system decides, not statistics
        ("ソファの上に猫が三匹いる", "ja"),
        ("", "en"),
    ],
)
def test_detects_the_prompts_language(text, code):
    assert detect_language(text) == code


def test_language_codes_are_normalised_or_refused():
    assert normalize_language("zh-CN") == "zh" and normalize_language("FR") == "fr" and normalize_language("pt_BR") == "pt"
    with pytest.raises(ValueError, match="ISO 639-1"):
        normalize_language("French")
