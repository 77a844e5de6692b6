"""Generation parameters in the PNGs of ``lmd generate``, read back by ``lmd info``."""

from __future__ import annotations

import json

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
