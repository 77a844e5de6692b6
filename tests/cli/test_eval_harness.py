"""`lmd eval` end to end on tiny random models: the real LMDPipeline on a tiny SD, the real OWL-ViT
classes on a tiny random detector, recorded responses or the planner against a fake LLM server.

The tiny detector detects garbage: these tests check the harness (files, resumability, the
results schema, the table, errors), not accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layout_planner import Layout, parse_layout_text
from layout_planner.benchmark import evaluate, parse_benchmark_prompt
from lmd.cli import main
from lmd.evaluation.detection import DetectorConfig, DetectorLoadError, OwlViTDetector
from lmd.evaluation.prompts import DEFAULT_PROMPTS, load_prompts, select_prompts
from lmd.evaluation.runner import RESULTS_SCHEMA, load_results

torch.set_num_threads(1)

RESPONSES = Path(__file__).parents[1] / "data" / "llm_responses_gpt-3.5-turbo.json"


def _eval(out: Path, sd: Path, detector: Path, *extra: str) -> int:
    return main([
        "eval", "--out", str(out), "--model", str(sd), "--detector", str(detector), "--device", "cpu",
        "--dtype", "float32", "--size", "64", "--steps", "2", "--preset", "fast", *extra,
    ])  # fmt: skip


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_detector_returns_named_boxes_best_first_after_class_aware_nms(tiny_owlvit_path: Path):
    detector = OwlViTDetector.from_pretrained(DetectorConfig(model=str(tiny_owlvit_path), score_threshold=0.0, nms_iou=0.15))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    names = ["red car", "dog"]
    found = detector.detect(image, names)
    assert found, "threshold 0 keeps every box that survives NMS"
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert {d.name for d in found} <= set(names)
    for d in found:  # normalised xyxy as predicted (centres inside the image; not clipped, as published)
        x0, y0, x1, y1 = d.box
        assert x0 <= x1 and y0 <= y1 and 0.0 <= (x0 + x1) / 2 <= 1.0 and 0.0 <= (y0 + y1) / 2 <= 1.0
    from torchvision.ops import box_iou

    for name in names:
        boxes = torch.tensor([d.box for d in found if d.name == name])
        if len(boxes) > 1:
            ious = box_iou(boxes, boxes).fill_diagonal_(0)
            assert float(ious.max()) <= 0.15 + 1e-6, "same-name boxes overlap above the NMS threshold"
    strict = OwlViTDetector(detector.processor, detector.model, DetectorConfig(model=str(tiny_owlvit_path), score_threshold=1.0))
    assert all(d.score >= 1.0 for d in strict.detect(image, names))  # random weights saturate some scores at 1.0
    assert detector.detect(image, []) == []


def test_detector_that_cannot_load(tmp_path: Path, capsys):
    with pytest.raises(DetectorLoadError, match="cannot load the OWL-ViT detector"):
        OwlViTDetector.from_pretrained(DetectorConfig(model=str(tmp_path / "no-such-detector")))


def test_eval_from_responses_writes_results_and_resumes(tmp_path: Path, tiny_sd_path: Path, tiny_owlvit_path: Path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "4") == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "per_box 1/1" in captured.err and "final 2/2" in captured.err, "the bar shows the image's stage and step"
    assert "generated 4, skipped 0, failed 0, pending 0" in captured.err
    assert "| method | negation | numeracy | attribution | spatial | overall | prompts |" in printed
    assert "4 generated" in printed

    chosen = select_prompts(load_prompts(DEFAULT_PROMPTS), 4)
    indices = [p.index for p in chosen]
    images = sorted((out / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{i:03d}.png" for i in indices]
    assert all(Image.open(p).size == (64, 64) for p in images)
    book = json.loads(RESPONSES.read_text())
    for prompt in chosen:  # the first occurrence of each prompt gets the first recorded answer
        layout = Layout.model_validate_json((out / "layouts" / f"{prompt.index:03d}.json").read_text())
        assert layout.phrases() == parse_layout_text(book[prompt.prompt][0]).phrases()

    raw = json.loads((out / "results.json").read_text())
    assert raw["schema"] == RESULTS_SCHEMA
    results = load_results(out / "results.json")
    assert results.generated == 4 and results.errors == 0
    assert [o.index for o in results.prompts] == indices
    assert set(results.scores) == {"negation", "numeracy", "attribution", "spatial", "overall"}
    assert results.scores["overall"].total == 4
    assert results.scores["overall"].passed == sum(o.passed for o in results.prompts)
    for task in ("negation", "numeracy", "attribution", "spatial"):
        score = results.scores[task]
        assert score.total == 1 and score.ci95 is not None and score.ci95[0] <= score.accuracy <= score.ci95[1]
    assert results.settings.variant == "lmd" and results.settings.layouts.startswith("responses llm_responses_gpt-3.5-turbo.json")
    assert results.detector.score_threshold == 0.15 and results.detector.nms_iou == 0.15
    # what reproducing the numbers needs
    assert (results.settings.steps, results.settings.scheduler, results.settings.dtype) == (2, "DDIMScheduler", "float32")
    assert results.options["steps"] == 2 and results.options["frozen_ratio"] == 0.4  # the fast preset, expanded
    assert results.environment["torch"] and torch.__version__.startswith(results.environment["torch"].split("+")[0])
    assert results.environment["device"] == "cpu" and results.environment["diffusers"] and results.environment["transformers"]
    queries = {o.task: o.queries for o in results.prompts}  # per image, as published
    spec = {o.task: parse_benchmark_prompt(o.prompt, o.task) for o in results.prompts}
    assert queries["negation"] == [spec["negation"].objects[0]] and queries["numeracy"] == [spec["numeracy"].objects[0]]
    assert queries["attribution"] == [f"{c} {n}" for c, n in zip(spec["attribution"].colours, spec["attribution"].objects)]
    assert queries["spatial"] == spec["spatial"].objects and len(set(queries["spatial"])) == 2
    for outcome in results.prompts:  # the recorded detections are what was scored
        assert outcome.seed == outcome.index and {d.name for d in outcome.detections} <= set(outcome.queries)
        rule = evaluate(spec[outcome.task], [d.as_rule_input() for d in outcome.detections])
        assert (outcome.passed, outcome.detail) == (rule.passed, rule.detail)
    assert (out / "results.md").read_text().startswith("| method |")

    # a second run generates nothing and rewrites the same scores
    before = _mtimes(out / "images")
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "4") == 0
    assert "0 generated, 4 on disk" in capsys.readouterr().out
    assert _mtimes(out / "images") == before
    again = load_results(out / "results.json")
    assert again.generated == 0
    assert [o.passed for o in again.prompts] == [o.passed for o in results.prompts]

    # an interrupted run (an image missing, one cut short mid-write, one not an image) is completed, nothing else regenerated
    missing, cut, garbage = (out / "images" / f"{i:03d}.png" for i in indices[1:])
    missing.unlink()
    damaged_layout = out / "layouts" / f"{indices[0]:03d}.json"
    damaged_layout.write_text('{"objects": [')
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    garbage.write_bytes(b"not a png")
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "4") == 0
    redone = load_results(out / "results.json")
    assert (redone.generated, redone.replaced) == (3, 2)
    after = _mtimes(out / "images")
    assert after[f"{indices[0]:03d}.png"] == before[f"{indices[0]:03d}.png"]
    assert Layout.model_validate_json(damaged_layout.read_text()).phrases() == parse_layout_text(book[chosen[0].prompt][0]).phrases()
    for path in (missing, cut, garbage):
        with Image.open(path) as image:
            image.load()
            assert image.size == (64, 64)
    assert not list((out / "images").glob(".*partial"))

    # other settings on the same directory are refused before anything loads, and nothing is lost
    capsys.readouterr()
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "4", "--seed", "7") == 2
    error = capsys.readouterr().err
    assert error.startswith("lmd eval: error:") and error.count("\n") == 1
    assert "holds a run with other settings (seed 0 -> 7); rerun with its settings to resume it, or use another --out" in error
    assert len(list((out / "images").glob("*.png"))) == 4
    # a second run while one is going is refused too (the lock dies with its process)
    import fcntl

    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242")
        held.flush()
        assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "4") == 2
    assert f"another lmd eval (pid 4242) is running in {out}; wait for it or use another --out" in capsys.readouterr().err
    # so is another scheduler (it changes every image), but not another row name
    monkeypatch.setenv("LMD_SCHEDULER", "EulerDiscreteScheduler")
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "4") == 2
    assert "(scheduler 'DDIMScheduler' -> 'EulerDiscreteScheduler')" in capsys.readouterr().err
    monkeypatch.delenv("LMD_SCHEDULER")
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "4", "--method", "LMD ours") == 0
    assert load_results(out / "results.json").settings.method == "LMD ours"
    assert "| LMD ours |" in (out / "results.md").read_text()
    assert _mtimes(out / "images") == after


def test_eval_plain_sd_baseline_renders_the_prompt_itself(tmp_path: Path, tiny_sd_path: Path, tiny_owlvit_path: Path):
    out = tmp_path / "baseline"
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--baseline", "sd", "--limit", "2", "--max-batch", "1") == 0
    results = load_results(out / "results.json")
    assert results.options["max_batch"] == 1
    assert results.settings.method == "SD (prompt only)" and results.settings.variant == "sd"
    from grounded_sd import LMDOptions, LMDPipeline

    pipe = LMDPipeline.from_pretrained(str(tiny_sd_path), device="cpu", dtype="float32")
    for outcome in results.prompts:
        layout = Layout.model_validate_json((out / "layouts" / f"{outcome.index:03d}.json").read_text())
        assert layout.objects == [] and layout.background == outcome.prompt
        # the image is plain SD on the benchmark prompt itself, with the prompt's seed
        plain = pipe(Layout(background=outcome.prompt), seed=outcome.index, options=LMDOptions.fast(steps=2, max_batch=1), variant="sd", width=64, height=64)
        assert plain.report.prompt == outcome.prompt
        assert np.array_equal(np.asarray(Image.open(out / outcome.image)), np.asarray(plain.image))


def test_eval_asks_the_planner_once_per_prompt(tmp_path: Path, tiny_sd_path: Path, tiny_owlvit_path: Path, fake_llm, monkeypatch):
    for key, value in fake_llm.env().items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "planned"
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--limit", "2") == 0
    assert len(fake_llm.requests) == 2
    results = load_results(out / "results.json")
    assert results.settings.layouts.startswith("planner fake-model at ")
    from layout_planner.template import load_template

    assert f"template {load_template().sha256[:12]}, chat" in results.settings.layouts  # another template: other layouts
    assert all(o.objects == 1 for o in results.prompts)  # the fake server's default layout: one cat
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--limit", "2") == 0
    assert len(fake_llm.requests) == 2, "a resumed run reuses the layouts on disk"


def test_eval_rejects_bad_options_in_one_line(tmp_path: Path, tiny_sd_path: Path, tiny_owlvit_path: Path, capsys):
    assert _eval(tmp_path / "a", tiny_sd_path, tiny_owlvit_path, "--baseline", "sd", "--variant", "lmd_plus") == 2
    assert "does not combine with --variant" in capsys.readouterr().err
    assert _eval(tmp_path / "a", tiny_sd_path, tiny_owlvit_path, "--baseline", "sd", "--max-batch", "0") == 2
    assert capsys.readouterr().err == "lmd eval: error: --max-batch must be at least 1, got 0\n"
    assert _eval(tmp_path / "b", tiny_sd_path, tmp_path / "no-detector", "--responses", str(RESPONSES), "--limit", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("lmd eval: error: cannot load the OWL-ViT detector") and err.count("\n") == 1
    assert _eval(tmp_path / "c", tiny_sd_path, tiny_owlvit_path, "--responses", str(tmp_path / "missing.json")) == 2
    assert "responses file not found" in capsys.readouterr().err
    assert _eval(tmp_path / "d", tmp_path / "no-model", tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "1") == 2
    assert "lmd eval: error:" in capsys.readouterr().err
    assert not list((tmp_path / "d" / "images").glob("*.png"))
    # a variant the model cannot run is refused from the UNet's config before any work, in one line
    assert _eval(tmp_path / "e", tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "2", "--variant", "lmd_plus") == 2
    err = capsys.readouterr().err
    assert err.startswith("lmd eval: error: variant lmd_plus needs a GLIGEN UNet") and err.count("\n") == 1
    assert not list((tmp_path / "e" / "layouts").glob("*.json"))
    # the failed run made nothing, so the corrected command may reuse its directory
    assert _eval(tmp_path / "d", tiny_sd_path, tiny_owlvit_path, "--responses", str(RESPONSES), "--limit", "1") == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(
    not (os.environ.get("LMD_TEST_SD_MODEL") and os.environ.get("LMD_TEST_OWLVIT")),
    reason="needs real weights: LMD_TEST_SD_MODEL (SD 1.5 directory) and LMD_TEST_OWLVIT (owlvit-base-patch32 directory)",
)
def test_eval_real_weights_quick_run(tmp_path: Path):
    out = tmp_path / "real"
    rc = main([
        "eval", "--out", str(out), "--model", os.environ["LMD_TEST_SD_MODEL"], "--detector", os.environ["LMD_TEST_OWLVIT"],
        "--device", "cuda", "--responses", str(RESPONSES), "--limit", "4", "--preset", "fast",
    ])  # fmt: skip
    assert rc == 0
    results = load_results(out / "results.json")
    assert results.generated == 4 and results.scores["overall"].total == 4


def test_eval_goes_on_when_the_llm_fails_one_prompt_and_stops_when_it_is_down(
    tmp_path: Path, tiny_sd_path: Path, tiny_owlvit_path: Path, fake_llm, monkeypatch, capsys
):
    for key, value in fake_llm.env().items():
        monkeypatch.setenv(key, value)
    chosen = [p.index for p in select_prompts(load_prompts(DEFAULT_PROMPTS), 3)]
    out = tmp_path / "outage"
    monkeypatch.setenv("LMD_LLM_MAX_ATTEMPTS", "2")
    for _ in range(2):  # an outage during the first prompt only
        fake_llm.enqueue_status(503, "overloaded")
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--limit", "3") == 2
    captured = capsys.readouterr()
    assert "1 prompt(s) have no layout yet" in captured.err and "run the same command again" in captured.err
    assert "INCOMPLETE: 1 prompt(s) not scored" in captured.out
    partial = load_results(out / "results.json")
    assert partial.incomplete is not None and partial.incomplete.prompts == [chosen[0]]
    assert partial.scores["overall"].total == 2 and partial.generated == 2  # the other prompts were not held up
    assert [o.scored for o in partial.prompts] == [False, True, True]

    # the rerun asks only for the missing layout and completes the run
    asked = len(fake_llm.requests)
    assert _eval(out, tiny_sd_path, tiny_owlvit_path, "--limit", "3") == 0
    assert len(fake_llm.requests) == asked + 1
    complete = load_results(out / "results.json")
    assert complete.incomplete is None and complete.scores["overall"].total == 3 and complete.generated == 1

    # an LLM that is down for 3 prompts in a row stops the run, with what was done written
    fake_llm.default_reply = None  # every request: 500 (after the planner's bounded retries)
    down = tmp_path / "down"
    assert _eval(down, tiny_sd_path, tiny_owlvit_path, "--limit", "4") == 2
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith("lmd eval: error: the LLM is unavailable for 3 prompts in a row")
    stopped = load_results(down / "results.json")
    assert stopped.incomplete is not None and len(stopped.incomplete.prompts) == 4
    assert stopped.incomplete.reason.startswith("stopped by LLMUnavailable")
    assert stopped.scores["overall"].total == 0 and not list((down / "images").glob("*.png"))


def test_a_layout_the_controller_refuses_fails_its_prompt_only(tmp_path: Path, tiny_sd_path: Path, tiny_owlvit_path: Path):
    from grounded_sd import LMDOptions, LMDPipeline
    from lmd.evaluation.runner import RunSettings, run_benchmark

    prompts = select_prompts(load_prompts(DEFAULT_PROMPTS), 2)
    book = json.loads(RESPONSES.read_text())
    layouts = {p.index: parse_layout_text(book[p.prompt][0]) for p in prompts}
    assert [len(layouts[p.index].objects) for p in prompts] == [0, 1]  # negation: no box; numeracy "one ...": one box
    options = LMDOptions.fast(steps=2).model_copy(update={"max_objects": 1})
    two_boxes = layouts[prompts[1].index].model_copy(
        update={"objects": [*layouts[prompts[1].index].objects, *layouts[prompts[1].index].objects]}
    )
    pipe = LMDPipeline.from_pretrained(str(tiny_sd_path), device="cpu", dtype="float32")
    detector = OwlViTDetector.from_pretrained(DetectorConfig(model=str(tiny_owlvit_path)))
    settings = RunSettings(method="m", variant="lmd", preset="fast", steps=2, model="tiny", scheduler="DDIMScheduler",
                           dtype="float32", layouts="test", seed=0, width=64, height=64)  # fmt: skip
    results = run_benchmark(
        prompts, out=tmp_path / "refused", settings=settings,
        layout_source=lambda p: two_boxes if p.index == prompts[1].index else layouts[p.index],
        make_generator=lambda: lambda layout, seed: pipe(layout, seed=seed, options=options, width=64, height=64).image,
        detector=detector.detect, detector_config=detector.config,
    )  # fmt: skip
    first, second = results.prompts
    assert first.error is None and first.image is not None
    assert not second.passed and second.scored and second.detail == "layout refused by the controller"
    assert second.error.startswith("InvalidLayoutError") and "at most 1" in second.error
    assert results.errors == 1 and results.scores["overall"].total == 2 and results.incomplete is None
