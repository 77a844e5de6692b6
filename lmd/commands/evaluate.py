"""``lmd eval``: the LMD benchmark at image level (layouts -> images -> OWL-ViT -> published rules).

Heavy libraries (torch, diffusers, transformers) load inside the handler only. Options left
unset fall back to ``lmd.settings.Settings`` (``LMD_SD_MODEL``, ``LMD_DEVICE``...). See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from grounded_sd.names import DTYPES, PRESETS, SAM_MODEL_TYPES, VARIANTS
from lmd.cli import CLIError
from lmd.settings import SEGMENTERS


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmd.evaluation.detection import DEFAULT_DETECTOR
    from lmd.shapes import SHAPES_DETECTOR

    parser = subparsers.add_parser(
        "eval",
        help="image-level LMD benchmark: generate, detect with OWL-ViT, score per task with 95%% CIs",
        description=(
            "Generate one image per benchmark prompt, detect its objects with OWL-ViT and score it with the "
            "published LMD rules. Resumable: images already in --out are not generated again."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="run directory (images, layouts, results)")
    parser.add_argument("--world", choices=["lmd", "shapes"], default="lmd",
                        help="lmd: the LMD benchmark's 400 prompts, scored with OWL-ViT (default); shapes: the shapes world's "
                             "400 prompts with their perfect layouts, the shipped shapes model at 64 px and its exact detector "
                             "(docs/shapes.md)")
    parser.add_argument("--layouts", choices=["stored", "planner"],
                        help="where layouts come from: stored (the prompt file's perfect layouts; the shapes world's default) "
                             "or planner (LMD_LLM_*, the default of --world lmd)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--responses", type=Path, metavar="JSON",
                        help="recorded LLM answers {prompt: [answer, ...]} instead of asking the LLM (LMD_LLM_*)")
    source.add_argument("--baseline", choices=["sd"],
                        help="the published 'SD alone' row: plain SD on the benchmark prompt itself, no layout")
    parser.add_argument("--variant", choices=VARIANTS, default="lmd",
                        help="stage 2: lmd (training-free), lmd_plus (needs a GLIGEN model), sd (plain SD with the layout's prompt); default lmd")
    parser.add_argument("--preset", choices=PRESETS, default="reference", help="controller options (default reference)")
    parser.add_argument("--conditioning", default="clip",
                        help="denoising conditioning: clip, ella, connector:PATH (gluenet needs the prompt in its own language; "
                             "docs/conditioning.md); default clip")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's, 50)")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="most samples per UNet call (default LMD_MAX_BATCH; unset: all objects x CFG at once); lower it on out-of-memory")
    parser.add_argument("--limit", type=int, metavar="N", help="N prompts spread evenly over the four tasks (default: all 400)")
    parser.add_argument("--seed", type=int, default=0, help="prompt NNN is generated with seed + NNN (default 0)")
    parser.add_argument("--size", type=int, help="image width and height in pixels (default 512; 64 with --world shapes)")
    parser.add_argument("--model", help="a name of LMD_MODELS, a Stable Diffusion hub id, directory or single-file "
                        "checkpoint (default: the first of LMD_MODELS, else LMD_SD_MODEL)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default LMD_DEVICE)")
    parser.add_argument("--dtype", choices=DTYPES, help="default LMD_DTYPE")
    parser.add_argument("--sam-checkpoint", type=Path, help="SAM checkpoint for masks (default LMD_SAM_CHECKPOINT; unset: attention masks)")
    parser.add_argument("--sam-model-type", choices=SAM_MODEL_TYPES, help="default LMD_SAM_MODEL_TYPE")
    parser.add_argument("--segmenter", choices=SEGMENTERS,
                        help="what cuts the masks: sam (the SAM checkpoint, else attention masks) or shapes (the shapes "
                             "world's exact colour segmenter); default LMD_SEGMENTER, shapes with --world shapes")
    parser.add_argument("--detector", help=f"OWL-ViT hub id or directory (default {DEFAULT_DETECTOR}; with --world shapes: "
                                           f"{SHAPES_DETECTOR}, the exact detector)")
    parser.add_argument("--score-threshold", type=float, default=0.15, help="detection score threshold (default 0.15, published)")
    parser.add_argument("--nms-iou", type=float, default=0.15, help="class-aware NMS IoU (default 0.15, published)")
    parser.add_argument("--prompts", type=Path,
                        help="benchmark prompts JSONL (default: the 400 LMD prompts, or the shapes world's with --world shapes)")
    parser.add_argument("--method", help="row name in the results table (default: from the variant and layout source)")
    parser.set_defaults(handler=run_eval)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _config(args: argparse.Namespace):
    """The run's typed config; a bad option is one line naming it."""
    from pydantic import ValidationError

    from lmd.evaluation.config import EvalConfig

    fields = {name: getattr(args, name) for name in EvalConfig.model_fields}
    try:
        return EvalConfig(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"]:
            message = f"--{str(first['loc'][0]).replace('_', '-')} {message}"
        raise CLIError(message) from None


def run_eval(args: argparse.Namespace) -> int:
    from lmd import wiring
    from lmd.evaluation.prompts import BenchmarkDataError, load_prompts, load_responses, select_prompts
    from lmd.evaluation.runner import EvalConflict, hold_run_lock, prepare_output

    config = _config(args)
    settings = wiring.load_settings()
    try:
        all_prompts = load_prompts(config.prompts)
        prompts = select_prompts(all_prompts, config.limit)
        responses = load_responses(config.responses, all_prompts) if config.responses else None
    except BenchmarkDataError as exc:
        raise CLIError(str(exc)) from None

    options = wiring.render_options(settings, config.preset, steps=config.steps, max_batch=config.max_batch)
    layout_source, layouts_label, method = _layout_source(config, settings, all_prompts, responses)
    run_settings = _run_settings(config, settings, options, layouts_label, method)
    try:  # refuse a directory in use or of other settings before loading anything
        hold_run_lock(config.out).close()
        prepare_output(config.out, run_settings)
    except EvalConflict as exc:
        raise CLIError(str(exc)) from None

    _check_before_work(config, settings, plans=not (config.baseline or responses is not None or config.layouts == "stored"))
    results = _run(config, settings, prompts, options, layout_source, run_settings)
    print((config.out / "results.md").read_text(encoding="utf-8"), end="")
    print(
        f"{results.generated} generated, {len(prompts) - results.generated - results.errors} on disk, "
        f"{results.errors} failed without an image; results in {config.out / 'results.json'}"
    )
    return 0


def _check_before_work(config, settings, *, plans: bool) -> None:
    """Before any model loads: the hub answers or the cache holds every model of the run
    (``lmd.hub``), and the variant fits the UNet's config; one line otherwise."""
    from grounded_sd.errors import GroundedSDError
    from grounded_sd.preflight import check_variant
    from lmd import hub, wiring

    model = wiring.model_source(settings, str(config.model)) if config.model else wiring.default_model(settings)
    planner = wiring.choose_planner(settings) if plans else None
    hub.prepare([
        hub.model_source("the diffusion model", model, "--model" if config.model else "LMD_SD_MODEL"),
        hub.model_source("the detector", config.detector, "--detector"),
        hub.model_source("the layout planner model", planner.model, "LMD_LOCAL_LLM_MODEL") if planner and planner.kind == "local" else None,
        *hub.conditioning_sources(config.conditioning, wiring.conditioning_config(settings)),
    ])
    try:
        check_variant(model, config.rendered_variant)
    except GroundedSDError as exc:
        raise CLIError(str(exc)) from None


def _device_and_dtype(config, settings):
    """The torch device and weights dtype the run will use (recorded in run.json before loading)."""
    from grounded_sd.errors import GroundedSDError
    from grounded_sd.pipeline import resolve_device, resolve_dtype

    try:
        torch_device = resolve_device(config.device or settings.device)
        return torch_device, resolve_dtype(config.dtype or settings.dtype, torch_device)
    except GroundedSDError as exc:
        raise CLIError(str(exc)) from None


def _run_settings(config, settings, options, layouts_label: str, method: str):
    """What fixes the run's images (run.json): a resumed run must match it."""
    from lmd import wiring
    from lmd.evaluation.runner import RunSettings

    _, torch_dtype = _device_and_dtype(config, settings)
    variant = config.rendered_variant
    sam = _sam_label(config, settings) if variant != "sd" else None
    return RunSettings(
        method=config.method or method,
        variant=variant,
        preset=config.preset,
        conditioning=config.conditioning,
        steps=options.steps,
        model=wiring.model_source(settings, str(config.model)) if config.model else wiring.default_model(settings),
        scheduler=settings.scheduler,
        dtype=str(torch_dtype).removeprefix("torch."),
        layouts=layouts_label,
        sam=sam,
        seed=config.seed,
        width=config.size,
        height=config.size,
        boxes_stretched=options.rescale_boxes and variant != "sd",
    )


def _sam_label(config, settings) -> str | None:
    """run.json's ``sam``: the checkpoint and type, the shapes segmenter, or None (attention masks)."""
    if (config.segmenter or settings.segmenter) == "shapes":
        return "shapes segmenter (colour regions, lmd.shapes.segmenter)"
    sam_checkpoint = config.sam_checkpoint or settings.sam_checkpoint
    sam_model_type = config.sam_model_type or settings.sam_model_type
    return f"{Path(sam_checkpoint).name} ({sam_model_type})" if sam_checkpoint else None


def _detector(config, device: str):
    from lmd.evaluation.detection import DetectorConfig, DetectorLoadError, OwlViTDetector
    from lmd.shapes import SHAPES_DETECTOR

    if config.detector == SHAPES_DETECTOR:
        from lmd.shapes.detector import detect_for_eval

        return DetectorConfig(model=SHAPES_DETECTOR, score_threshold=0.0, nms_iou=0.0, device="cpu"), detect_for_eval

    detector_config = DetectorConfig(
        model=config.detector, score_threshold=config.score_threshold, nms_iou=config.nms_iou, device=device
    )
    try:
        return detector_config, OwlViTDetector.from_pretrained(detector_config).detect
    except DetectorLoadError as exc:
        raise CLIError(str(exc)) from None


class _EvalProgress:
    """The run's bar: one step per prompt; its suffix counts outcomes and shows the current stage."""

    def __init__(self, total: int, method: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"lmd eval {method}", unit="image", dynamic_ncols=True)
        self.counts = {"generated": 0, "skipped": 0, "failed": 0, "pending": 0}

    def say(self, what: str) -> None:
        self.bar.set_postfix_str(f"{_counts_text(self.counts)}; {what}", refresh=True)

    def stage(self, stage: str, step: int, total: int) -> None:
        self.say(f"{stage} {step}/{total}")

    def prompt_done(self, prompt, what: str) -> None:
        self.counts[what] += 1
        self.bar.set_postfix_str(_counts_text(self.counts), refresh=False)
        if what == "skipped":  # done by an earlier run: counted, but not in the rate (it would read hundreds per second)
            self.bar.n += 1
            self.bar.initial += 1
            self.bar.last_print_n = self.bar.n
            self.bar.refresh()
        else:
            self.bar.update(1)


def _generator_factory(config, settings, options, run_settings, progress: _EvalProgress):
    """``make_generator`` for the runner: loads the pipeline only when a first image is missing."""
    from grounded_sd.errors import GroundedSDError
    from grounded_sd.masks import SamCheckpointError
    from lmd import wiring

    variant, size = config.rendered_variant, config.size

    def make_generator():
        progress.say(f"loading {run_settings.model}")
        try:
            pipe = wiring.load_pipeline(
                settings, model=config.model, device=config.device, dtype=run_settings.dtype,
                sam_checkpoint=config.sam_checkpoint, sam_model_type=config.sam_model_type, use_sam=variant != "sd",
                segmenter=config.segmenter,
            )
            conditioning = wiring.conditionings(settings, pipe).get(config.conditioning)
        except (GroundedSDError, SamCheckpointError) as exc:
            raise CLIError(str(exc)) from None

        def generate(layout, seed):
            return pipe(layout, seed=seed, options=options, variant=variant, width=size, height=size,
                        progress=progress.stage, conditioning=conditioning).image

        return generate

    return make_generator


def _run(config, settings, prompts, options, layout_source, run_settings):
    """Load the detector, run the benchmark with a progress bar; every stop a one-line CLIError."""
    import torch

    from grounded_sd.errors import GroundedSDError
    from layout_planner.errors import LLMUnavailable
    from lmd import wiring
    from lmd.evaluation.runner import (
        MAX_CONSECUTIVE_UNAVAILABLE, EvalConflict, EvalIncomplete, environment_versions, run_benchmark,
    )

    wiring.quiet_library_progress_bars()  # our bar shows progress; per-file loading bars would break it
    wiring.use_torch_threads(settings.torch_threads)
    torch_device, _ = _device_and_dtype(config, settings)
    detector_config, detector = _detector(config, str(torch_device))
    progress = _EvalProgress(len(prompts), run_settings.method)
    out = config.out
    try:
        return run_benchmark(
            prompts, out=out, settings=run_settings, layout_source=layout_source,
            make_generator=_generator_factory(config, settings, options, run_settings, progress),
            detector=detector, detector_config=detector_config, options=options.model_dump(mode="json"),
            environment=environment_versions(str(torch_device)), on_prompt=progress.prompt_done,
        )
    except EvalConflict as exc:
        raise CLIError(str(exc)) from None
    except EvalIncomplete as exc:
        progress.bar.close()
        print((out / "results.md").read_text(encoding="utf-8"), end="")
        raise CLIError(str(exc)) from None
    except torch.cuda.OutOfMemoryError:
        raise CLIError(
            f"out of GPU memory: lower --max-batch (LMD_MAX_BATCH) or --size; finished images are kept in {out}"
        ) from None
    except GroundedSDError as exc:
        raise CLIError(f"generation failed ({type(exc).__name__}): {exc}; finished images are kept in {out}") from None
    except LLMUnavailable as exc:
        raise CLIError(
            f"the LLM is unavailable for {MAX_CONSECUTIVE_UNAVAILABLE} prompts in a row: {exc}; finished layouts and images "
            f"are kept in {out} and scored in results.json; run the same command again to complete the run"
        ) from None
    finally:
        progress.bar.close()


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _layout_source(config, settings, all_prompts, responses):
    """(layout for a prompt, label recorded in run.json, default row name)."""
    from layout_planner import Layout, parse_layout_text

    if config.baseline:
        return (lambda prompt: Layout(objects=[], background=prompt.prompt)), "prompt", "SD (prompt only)"
    if config.layouts == "stored":
        missing = [p.index for p in all_prompts if p.layout is None]
        if missing:
            raise CLIError(f"--layouts stored: {config.prompts} has no layout for prompt {missing[0]} ({len(missing)} in all)")
        label = f"stored {config.prompts.name} sha256:{_file_digest(config.prompts)}"
        return (lambda prompt: prompt.layout), label, f"{config.variant} (perfect layouts)"
    if responses is not None:
        label = f"responses {config.responses.name} sha256:{_file_digest(config.responses)}"
        return (lambda prompt: parse_layout_text(responses[prompt.index])), label, f"{config.variant} ({config.responses.stem})"

    from lmd import wiring
    from lmd.evaluation.prompts import occurrence_numbers

    planner = wiring.planner(settings)
    llm = planner.config
    endpoint = wiring.choose_planner(settings).endpoint
    samples = occurrence_numbers(all_prompts)
    label = (
        f"planner {llm.model} {f'at {endpoint}' if endpoint else 'in process'} (temperature {llm.temperature}, "
        f"template {planner.template.sha256[:12]}, {llm.mode})"
    )
    return (lambda prompt: planner.plan(prompt.prompt, sample_index=samples[prompt.index])), label, f"{config.variant} ({llm.model})"
