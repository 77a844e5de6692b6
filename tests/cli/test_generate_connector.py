"""A connector trained by ``lmd train-connector`` conditions a full LMD run of ``lmd generate``
on the tiny SD; in ``tokens`` mode (the default for LI-DiT connectors) guidance reads each
phrase on the connector's own tokens, in ``replace`` mode on CLIP's."""

from __future__ import annotations

import json

import yaml
from transformers import CLIPTokenizer

from grounded_sd.conditioning.trained import TrainedConnector
from grounded_sd.prompts import object_phrase_span, object_prompt, object_token_indices
from lmd.cli import main
from tests.cli.test_generate import FAST
from tests.support.builders import box_object, layout_data
from tests.support.shapes import make_shapes

# phrases whose token counts differ between the tiny CLIP (6, 3) and the tiny LLM (4, 5)
LAYOUT = layout_data(
    box_object("apple", "a green apple", [0.05, 0.1, 0.45, 0.6]),
    box_object("car", "a blue car", [0.5, 0.4, 0.95, 0.95]),
    background="a realistic park",
)


def test_exported_connector_conditions_lmd_generate(clean_env, tiny_sd_path, tiny_llm_path, capsys):
    config = {
        "base_model": str(tiny_sd_path), "output_dir": str(clean_env / "run"),
        "connector": {"encoders": [{"model": str(tiny_llm_path), "max_tokens": 16}], "refiner": {"blocks": 1, "cond_dim": 16}},
        "data": {"path": str(make_shapes(clean_env / "shapes", count=4)), "resolution": 32, "num_workers": 0},
        "training": {"steps": 2, "batch_size": 2}, "validation": {"every": 100, "steps": 1, "prompts": ["a red cat"]},
    }
    (clean_env / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train-connector", "--config", str(clean_env / "run.yaml"), "--quiet"]) == 0
    export = clean_env / "run" / "connector"
    (clean_env / "layout.json").write_text(json.dumps(LAYOUT))
    reports = {}
    for mode in ("tokens", "replace"):
        out = clean_env / mode
        argv = ["generate", "--layout", str(clean_env / "layout.json"), "--out", str(out), "--model", str(tiny_sd_path),
                "--conditioning", f"connector:{export}", "--seed", "1", *FAST]
        if mode == "replace":
            argv += ["--conditioning-mode", "replace"]
        assert main(argv) == 0, capsys.readouterr().err
        reports[mode] = json.loads((out / "report.json").read_text())
        assert (out / "image.png").is_file()
    tokens, replace = reports["tokens"], reports["replace"]
    assert (tokens["conditioning"], tokens["conditioning_mode"]) == (f"connector:{export}", "tokens")
    assert replace["conditioning_mode"] == "replace"
    assert [s["name"] for s in tokens["stages"]] == ["per_box", "masks", "final"]
    # per-box guidance targets: the connector's tokens of each phrase (tokens) vs CLIP's (replace)
    connector = TrainedConnector.load(export)
    background = LAYOUT["background"]
    for index, obj in enumerate(LAYOUT["objects"]):
        encoded = connector.encode([object_prompt(background, obj["phrase"])])
        own = encoded[0].tokens_for_span(0, *object_phrase_span(background, obj["phrase"]))
        assert tokens["objects"][index]["token_count"] == len(own)
    clip = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    clip_counts = [len(object_token_indices(clip, background, o["phrase"])) for o in LAYOUT["objects"]]
    assert [o["token_count"] for o in replace["objects"]] == clip_counts
    assert [o["token_count"] for o in tokens["objects"]] != clip_counts
    # same seed, same denoising conditioning: the first energies differ only by what guidance reads
    for a, b in zip(tokens["objects"], replace["objects"]):
        assert a["per_box_energy"]["start"] != b["per_box_energy"]["start"]
    for obj in tokens["objects"]:
        assert obj["per_box_energy"]["start"] is not None
