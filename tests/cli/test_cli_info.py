"""Generation parameters in the PNGs of ``lmd generate``, read back by ``lmd info``."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from grounded_sd import read_parameters
from layout_planner import Layout
from lmd.cli import main

LAYOUT = {
    "objects": [
        {"id": "cat", "phrase": "a red cat", "box": [0.05, 0.1, 0.45, 0.6]},
        {"id": "dog", "phrase": "un chien à droite", "box": [0.5, 0.4, 0.95, 0.95]},
    ],
    "background": "a realistic park",
    "negative": "birds",
}


def test_generate_writes_parameters_that_info_reads_back(clean_env, tiny_sd_path, capsys):
    layout_path = clean_env / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    out = clean_env / "out"
    code = main(["generate", "--layout", str(layout_path), "--out", str(out), "--model", str(tiny_sd_path),
                 "--seed", "31", "--steps", "3", "--width", "64", "--height", "48", "--preset", "fast",
                 "--negative", "blurry", "--guidance-scale", "6.5", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()

    for name in ("image.png", "overlay.png", "masks/cat.png"):
        params = read_parameters(out / name)
        assert params.layout == Layout.model_validate(LAYOUT), name
    assert (params.seed, params.steps, params.width, params.height) == (31, 3, 64, 48)
    assert (params.variant, params.preset, params.guidance_scale) == ("lmd", "fast", 6.5)
    assert params.model == str(tiny_sd_path) and params.scheduler == "DDIMScheduler"
    assert params.negative_prompt == "blurry"
    assert "birds" in params.conditioning.negative_prompt and "blurry" in params.conditioning.negative_prompt
    assert "un chien à droite" in params.conditioning.prompt
    assert set(params.conditioning.per_box_prompts) == {"cat", "dog"} and params.conditioning.name == "clip"
    assert params.version
    assert Image.open(out / "image.png").text["lmd:seed"] == "31"

    layout_out = clean_env / "again.json"
    assert main(["info", str(out / "image.png"), "--layout-out", str(layout_out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 31 and printed["layout"]["objects"][1]["phrase"] == "un chien à droite"
    assert Layout.model_validate_json(layout_out.read_text()) == Layout.model_validate(LAYOUT)

    # the layout read back renders the same image again
    again = clean_env / "again"
    assert main(["generate", "--layout", str(layout_out), "--out", str(again), "--model", str(tiny_sd_path),
                 "--seed", "31", "--steps", "3", "--width", "64", "--height", "48", "--preset", "fast",
                 "--negative", "blurry", "--guidance-scale", "6.5", "--quiet", "--device", "cpu"]) == 0
    assert Image.open(again / "image.png").tobytes() == Image.open(out / "image.png").tobytes()


def test_info_on_a_png_without_parameters_is_one_line(clean_env, capsys):
    plain = clean_env / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["info", str(plain)]) == 2
    assert "carries no lmd generation parameters" in capsys.readouterr().err
    assert main(["info", str(clean_env / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    (clean_env / "text.png").write_text("not an image")
    assert main(["info", str(clean_env / "text.png")]) == 2
    assert "cannot read it as an image" in capsys.readouterr().err


# --- hostile PNGs (issue 19, defect 7): one line each, nothing inflated, no pixel decoded ----------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _itxt(keyword: str, text: bytes, compressed: bool = False) -> bytes:
    import zlib

    body = zlib.compress(text, 9) if compressed else text
    return _chunk(b"iTXt", keyword.encode() + b"\0" + (b"\1\0" if compressed else b"\0\0") + b"\0\0" + body)


def _png(*chunks: bytes, width: int = 8, height: int = 8, end: bool = True) -> bytes:
    import struct
    import zlib

    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * min(height, 8)))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + (_chunk(b"IEND", b"") if end else b"")


def _parameters_chunks(**overrides: bytes) -> list[bytes]:
    """The lmd:* chunks of a valid image, some replaced by ``overrides`` (field -> raw text)."""
    fields = {"prompt": b"a cat", "layout": json.dumps(LAYOUT).encode(), "seed": b"1", "steps": b"2",
              "guidance_scale": b"7.5", "width": b"8", "height": b"8", "variant": b"lmd", "preset": b"fast",
              "model": b"m", "scheduler": b"DDIMScheduler",
              "conditioning": b'{"prompt": "a cat", "negative_prompt": ""}', **overrides}
    return [_itxt(f"lmd:{k}", v) for k, v in fields.items()]


HOSTILE = {
    "deeply nested JSON": (_png(*_parameters_chunks(layout=b"[" * 100_000 + b"]" * 100_000)), "nested deeper"),
    "a compressed-text bomb": (_png(_itxt("lmd:prompt", b"\0" * 50_000_000, compressed=True)), "carries no lmd"),
    "an oversized text chunk": (_png(*_parameters_chunks(prompt=b"x" * 2_000_000)), "larger than the 256 KiB"),
    "a cut file": (_png(*_parameters_chunks(), end=False)[:-20], "cut short"),
    "endless empty chunks": (_png(*[_chunk(b"tIME", b"")] * 20_000), "more than 10000 chunks"),
    "not a PNG": (b"GIF89a" + b"\0" * 100, "cannot read it as an image"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_info_answers_a_hostile_png_with_one_line(clean_env, capsys, name):
    content, words = HOSTILE[name]
    path = clean_env / "hostile.png"
    path.write_bytes(content)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err, err
    assert len(err) < 500


def test_info_reads_the_text_of_a_pixel_bomb_without_decoding_a_pixel(clean_env, capsys):
    """40,000 x 40,000 pixels declared (PIL refuses it as a decompression bomb): the text is all we need."""
    path = clean_env / "bomb.png"
    path.write_bytes(_png(*_parameters_chunks(), width=40_000, height=40_000))
    assert main(["info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "a cat"
