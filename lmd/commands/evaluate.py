"""``lmd eval``: the LMD benchmark at image level (layouts -> images -> OWL-ViT -> published rules).

Heavy libraries (torch, diffusers, transformers) load inside the handler only. Options left
unset fall back to ``lmd.settings.Settings`` (``LMD_SD_MODEL``, ``LMD_DEVICE``...). See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from grounded_sd.names import DTYPES, PRESETS, VARIANTS
from lmd.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmd.evaluation.detection import DEFAULT_DETECTOR
    from lmd.evaluation.prompts import DEFAULT_PROMPTS

    parser = subparsers.add_parser(
        "eval",
        help="image-level LMD benchmark: generate, detect with OWL-ViT, score per task with 95%% CIs",
        description=(
            "Generate one image per benchmark prompt, detect its objects with OWL-ViT and score it with the "
            "published LMD rules. Resumable: images already in --out are not generated again."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="run directory (images, layouts, results)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--responses", type=Path, metavar="JSON",
                        help="recorded LLM answers {prompt: [answer, ...]} instead of asking the LLM (LMD_LLM_*)")
    source.add_argument("--baseline", choices=["sd"],
                        help="the published 'SD alone' row: plain SD on the benchmark prompt itself, no layout")
    parser.add_argument("--variant", choices=VARIANTS, default="lmd",
                        help="stage 2: lmd (training-free), lmd_plus (needs a GLIGEN model), sd (plain SD with the layout's prompt); default lmd")
    parser.add_argument("--preset", choices=PRESETS, default="reference", help="controller options (default reference)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's, 50)")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="most samples per UNet call (default LMD_MAX_BATCH; unset: all objects x CFG at once); lower it on out-of-memory")
    parser.add_argument("--limit", type=int, metavar="N", help="N prompts spread evenly over the four tasks (default: all 400)")
    parser.add_argument("--seed", type=int, default=0, help="prompt NNN is generated with seed + NNN (default 0)")
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels (default 512)")
    parser.add_argument("--model", help="Stable Diffusion hub id or directory (default LMD_SD_MODEL)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default LMD_DEVICE)")
    parser.add_argument("--dtype", choices=DTYPES, help="default LMD_DTYPE")
    parser.add_argument("--sam-checkpoint", type=Path, help="SAM checkpoint for masks (default LMD_SAM_CHECKPOINT; unset: attention masks)")
    parser.add_argument("--sam-model-type", choices=["vit_h", "vit_l", "vit_b"], help="default LMD_SAM_MODEL_TYPE")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, help=f"OWL-ViT hub id or directory (default {DEFAULT_DETECTOR})")
    parser.add_argument("--score-threshold", type=float, default=0.15, help="detection score threshold (default 0.15, published)")
    parser.add_argument("--nms-iou", type=float, default=0.15, help="class-aware NMS IoU (default 0.15, published)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="benchmark prompts JSONL (default: the 400 LMD prompts)")
    parser.add_argument("--method", help="row name in the results table (default: from the variant and layout source)")
    parser.set_defaults(handler=run_eval)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def run_eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from layout_planner.errors import LLMUnavailable
    from lmd.evaluation.detection import DetectorConfig
    from lmd.evaluation.prompts import BenchmarkDataError, load_prompts, load_responses, select_prompts
    from lmd.evaluation.runner import (
        MAX_CONSECUTIVE_UNAVAILABLE,
        EvalConflict,
        EvalIncomplete,
        RunSettings,
        hold_run_lock,
        prepare_output,
        run_benchmark,
    )
    from lmd.settings import Settings

    if args.baseline and args.variant != "lmd":
        raise CLIError("--baseline sd renders the prompt without a layout; it does not combine with --variant")
    if args.size < 64 or args.size % 8:
        raise CLIError(f"--size must be a multiple of 8 of at least 64, got {args.size}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if args.max_batch is not None and args.max_batch < 1:
        raise CLIError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    for name in ("score_threshold", "nms_iou"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise CLIError(f"--{name.replace('_', '-')} must lie in 0..1")
    try:
        settings = Settings()
    except ValidationError as exc:
        raise CLIError(f"invalid settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    try:
        all_prompts = load_prompts(args.prompts)
        prompts = select_prompts(all_prompts, args.limit)
        responses = load_responses(args.responses, all_prompts) if args.responses else None
    except BenchmarkDataError as exc:
        raise CLIError(str(exc)) from None

    import torch

    from grounded_sd import LMDOptions
    from grounded_sd.errors import GroundedSDError
    from grounded_sd.pipeline import resolve_device, resolve_dtype

    device = args.device or settings.device
    try:
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(args.dtype or settings.dtype, torch_device)
    except GroundedSDError as exc:
        raise CLIError(str(exc)) from None
    options_factory = LMDOptions.fast if args.preset == "fast" else LMDOptions.reference
    overrides = {k: v for k, v in (("steps", args.steps), ("max_batch", args.max_batch or settings.max_batch)) if v}
    options = options_factory(**overrides)

    layout_source, layouts_label, method = _layout_source(args, settings, all_prompts, responses)
    model = args.model or settings.sd_model
    sam_checkpoint = args.sam_checkpoint or settings.sam_checkpoint
    sam_model_type = args.sam_model_type or settings.sam_model_type
    variant = "sd" if args.baseline else args.variant
    run_settings = RunSettings(
        method=args.method or method,
        variant=variant,
        preset=args.preset,
        steps=options.steps,
        model=str(model),
        scheduler=settings.scheduler,
        dtype=str(torch_dtype).removeprefix("torch."),
        layouts=layouts_label,
        sam=f"{Path(sam_checkpoint).name} ({sam_model_type})" if sam_checkpoint and variant != "sd" else None,
        seed=args.seed,
        width=args.size,
        height=args.size,
    )

    try:  # refuse a directory in use or of other settings before loading anything
        hold_run_lock(args.out).close()
        prepare_output(args.out, run_settings)
    except EvalConflict as exc:
        raise CLIError(str(exc)) from None

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from grounded_sd import LMDPipeline
    from grounded_sd.masks import SamCheckpointError
    from lmd.evaluation.detection import DetectorLoadError, OwlViTDetector
    from lmd.evaluation.runner import environment_versions

    transformers_logging.disable_progress_bar()  # our bar shows progress; per-file loading bars would break it
    diffusers_logging.disable_progress_bar()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    detector_config = DetectorConfig(
        model=args.detector, score_threshold=args.score_threshold, nms_iou=args.nms_iou, device=str(torch_device)
    )
    try:
        detector = OwlViTDetector.from_pretrained(detector_config)
    except DetectorLoadError as exc:
        raise CLIError(str(exc)) from None

    bar = tqdm(total=len(prompts), desc=f"lmd eval {run_settings.method}", unit="image", dynamic_ncols=True)
    counts = {"generated": 0, "skipped": 0, "failed": 0, "pending": 0}

    def make_generator():
        bar.set_postfix_str(f"{_counts_text(counts)}; loading {model}", refresh=True)
        try:
            pipe = LMDPipeline.from_pretrained(
                model, device=device, dtype=run_settings.dtype, scheduler=settings.scheduler,
                sam_checkpoint=sam_checkpoint if variant != "sd" else None, sam_model_type=sam_model_type,
            )  # fmt: skip
        except (GroundedSDError, SamCheckpointError) as exc:
            raise CLIError(str(exc)) from None

        def generate(layout, seed):
            def progress(stage: str, step: int, total: int) -> None:
                bar.set_postfix_str(f"{_counts_text(counts)}; {stage} {step}/{total}", refresh=True)

            return pipe(layout, seed=seed, options=options, variant=variant, width=args.size, height=args.size, progress=progress).image

        return generate

    def on_prompt(prompt, what: str) -> None:
        counts[what] += 1
        bar.set_postfix_str(_counts_text(counts), refresh=False)
        bar.update(1)

    try:
        results = run_benchmark(
            prompts,
            out=args.out,
            settings=run_settings,
            layout_source=layout_source,
            make_generator=make_generator,
            detector=detector.detect,
            detector_config=detector_config,
            options=options.model_dump(mode="json"),
            environment=environment_versions(str(torch_device)),
            on_prompt=on_prompt,
        )
    except EvalConflict as exc:
        raise CLIError(str(exc)) from None
    except EvalIncomplete as exc:
        bar.close()
        print((args.out / "results.md").read_text(encoding="utf-8"), end="")
        raise CLIError(str(exc)) from None
    except torch.cuda.OutOfMemoryError:
        raise CLIError(
            f"out of GPU memory: lower --max-batch (LMD_MAX_BATCH) or --size; finished images are kept in {args.out}"
        ) from None
    except GroundedSDError as exc:
        raise CLIError(f"generation failed ({type(exc).__name__}): {exc}; finished images are kept in {args.out}") from None
    except LLMUnavailable as exc:
        raise CLIError(
            f"the LLM is unavailable for {MAX_CONSECUTIVE_UNAVAILABLE} prompts in a row: {exc}; finished layouts and images "
            f"are kept in {args.out} and scored in results.json; run the same command again to complete the run"
        ) from None
    finally:
        bar.close()

    print((args.out / "results.md").read_text(encoding="utf-8"), end="")
    print(
        f"{results.generated} generated, {len(prompts) - results.generated - results.errors} on disk, "
        f"{results.errors} failed without an image; results in {args.out / 'results.json'}"
    )
    return 0


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _layout_source(args, settings, all_prompts, responses):
    """(layout for a prompt, label recorded in run.json, default row name)."""
    from layout_planner import Layout, parse_layout_text

    if args.baseline:
        return (lambda prompt: Layout(objects=[], background=prompt.prompt)), "prompt", "SD (prompt only)"
    if responses is not None:
        label = f"responses {args.responses.name} sha256:{_file_digest(args.responses)}"
        return (lambda prompt: parse_layout_text(responses[prompt.index])), label, f"{args.variant} ({args.responses.stem})"

    from layout_planner import Planner
    from lmd.commands.plan import llm_config_from_settings
    from lmd.evaluation.prompts import occurrence_numbers

    config = llm_config_from_settings(settings)
    planner = Planner(config)
    samples = occurrence_numbers(all_prompts)
    label = (
        f"planner {config.model} at {config.base_url} (temperature {config.temperature}, "
        f"template {planner.template.sha256[:12]}, {config.mode})"
    )
    return (lambda prompt: planner.plan(prompt.prompt, sample_index=samples[prompt.index])), label, f"{args.variant} ({config.model})"

