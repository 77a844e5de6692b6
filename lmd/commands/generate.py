"""``lmd generate``: prompt -> layout (stage 1) -> image (stage 2) in one process, no Redis.

``lmd generate "PROMPT" --out DIR`` plans with the configured LLM, then renders;
``lmd generate --layout layout.json --out DIR`` renders a given layout. DIR (default: a new
``outputs/YYYYMMDD-HHMMSS`` under the working directory) receives image.png, overlay.png,
masks/<id>.png, layout.json and report.json. Configuration that cannot work (a conditioning's
missing files, GlueNet without a checkpoint for the prompt's language, ``lmd_plus`` on a UNet
without GLIGEN, an unreachable hub or LLM endpoint) is refused before planning. Defaults come from
``lmd.settings.Settings`` (LMD_SD_MODEL, LMD_SAM_CHECKPOINT, LMD_DEVICE...). torch is imported
only when this command runs.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from grounded_sd.names import DTYPES, PRESETS, SAM_MODEL_TYPES, VARIANTS
from lmd import wiring
from lmd.cli import CLIError
from lmd.settings import SEGMENTERS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="render a prompt or a layout with layout-grounded diffusion",
        description=(
            "Plan a layout for PROMPT with the LLM (or read one with --layout), render it with the "
            "layout-grounded controller, and write image.png, overlay.png, masks/, layout.json and "
            "report.json to --out."
        ),
    )
    parser.add_argument("prompt", nargs="?", help="the image prompt (omit with --layout)")
    parser.add_argument("--layout", type=Path, metavar="JSON", help="render this layout (skips the LLM)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output directory (created; default: a new outputs/YYYYMMDD-HHMMSS in the working directory)")
    parser.add_argument("--seed", type=int, help="job seed (default: random, printed and kept in report.json)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's, 50)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--variant", choices=VARIANTS, help="lmd, sd (baseline), lmd_plus (GLIGEN UNets); default LMD_VARIANT, lmd")
    parser.add_argument("--preset", choices=PRESETS, help="option preset (default LMD_PRESET, reference)")
    parser.add_argument("--negative", metavar="TEXT", help="extra negative prompt, added to the layout's")
    parser.add_argument("--model", help="a name of LMD_MODELS, a hub id, a local diffusers directory or a single "
                        ".safetensors/.ckpt file (default: the first of LMD_MODELS, else LMD_SD_MODEL)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", type=lora_argument,
                        help="apply the LoRA adapter NAME of LMD_LORAS with WEIGHT (default 1); repeatable (docs/models.md)")
    parser.add_argument("--scheduler", help="diffusers scheduler class (default LMD_SCHEDULER, DDIMScheduler)")
    parser.add_argument("--sam-checkpoint", type=Path, help="segment-anything checkpoint (default LMD_SAM_CHECKPOINT; unset: attention masks)")
    parser.add_argument("--sam-model-type", choices=SAM_MODEL_TYPES, help="SAM architecture (default LMD_SAM_MODEL_TYPE, vit_b)")
    parser.add_argument("--segmenter", choices=SEGMENTERS,
                        help="what cuts the masks: sam (the SAM checkpoint, else attention masks) or shapes (the shapes world's "
                             "exact colour segmenter, for models/shapes); default LMD_SEGMENTER, sam")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default LMD_DEVICE, auto)")
    parser.add_argument("--dtype", choices=DTYPES, help="default LMD_DTYPE, auto: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's own, 512 for SD 1.5, 64 for models/shapes)")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's own, as --width)")
    parser.add_argument("--max-batch", type=int, help="most samples per UNet call (default LMD_MAX_BATCH; unset: all objects x CFG at once)")
    parser.add_argument("--guidance-checkpointing", action="store_true", default=None,
                        help="recompute guidance's UNet blocks in its backward: less memory per object, a few %% more time (default LMD_GUIDANCE_CHECKPOINTING)")
    parser.add_argument("--refiner", metavar="MODEL", help="finish the image with this SDXL refiner (hub id or local directory; default LMD_REFINER, unset: none)")
    parser.add_argument("--refiner-strength", type=float, help="fraction of the refiner's schedule redone (default LMD_REFINER_STRENGTH, 0.3)")
    parser.add_argument("--no-refiner", action="store_true", help="no refiner pass even when LMD_REFINER is set")
    add_conditioning_arguments(parser)
    parser.add_argument("--language", metavar="CODE", help="ISO 639-1 language of PROMPT for gluenet (default: detected)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_generate)


def lora_argument(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:WEIGHT`` (argparse type of ``--lora``)."""
    name, _, weight = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:WEIGHT, got {text!r}")
    try:
        value = float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"the weight of {name!r} must be a number, got {weight!r}") from None
    if not -10.0 <= value <= 10.0:
        raise argparse.ArgumentTypeError(f"the weight of {name!r} must be in -10..10, got {value:g}")
    return name, value


def add_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    """``--conditioning``, ``--conditioning-mode`` and ``--conditioning-negative``."""
    parser.add_argument(
        "--conditioning", metavar="NAME",
        help="what the denoising is conditioned on: clip, ella, gluenet, connector:PATH (default LMD_CONDITIONING, clip; docs/conditioning.md)",
    )
    parser.add_argument(
        "--conditioning-mode", choices=("replace", "concat", "tokens"),
        help="replace (guidance on CLIP; default), concat (ELLA tokens before CLIP's), tokens (per-token connectors)",
    )
    parser.add_argument(
        "--conditioning-negative", choices=("layout", "empty"),
        help="what ella/connector encode as the negative: layout (the layout's negative prompt; default) or empty "
             "(\"\", as ELLA's official pipeline); CLIP always encodes the layout's",
    )


def _read_layout(path: Path):
    from layout_planner.layout import Layout

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    try:
        return Layout.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "layout"
        raise CLIError(f"{path}: {where}: {first['msg']}") from None


def _plan(prompt: str, settings):
    """Stage 1; a local planner says which model and why, and its first download, on stderr."""
    from layout_planner import PlannerError

    try:
        planner = wiring.ready_planner(settings, say=lambda line: print(f"lmd generate: {line}", file=sys.stderr, flush=True),
                                       check_endpoint=True)
    except PlannerError as exc:
        raise CLIError(str(exc)) from None
    try:
        return planner.plan(prompt)
    except PlannerError as exc:
        raise CLIError(str(exc)) from None
    finally:
        planner.close()


class _StageBars:
    """One tqdm bar per stage, fed by the pipeline's progress callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.stage, self.bar = enabled, None, None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            # initial=step: the steps done before the first report are not counted in the rate,
            # which would otherwise start at thousands of steps per second.
            self.stage = stage
            self.bar = tqdm(total=total, initial=step, desc=stage, unit="step", file=sys.stderr, leave=True)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_generate(args: argparse.Namespace) -> int:
    _check_arguments(args)
    settings = wiring.load_settings()
    model = wiring.model_source(settings, args.model) if args.model else wiring.default_model(settings)
    try:
        args.loras = wiring.lora_choices(settings, args.lora)
    except wiring.UnknownName as exc:
        raise CLIError(f"--lora: {exc}") from None
    if args.segmenter == "shapes" and args.sam_checkpoint is not None:
        raise CLIError("--segmenter shapes cuts masks without SAM; it does not combine with --sam-checkpoint")
    sam_checkpoint = args.sam_checkpoint or settings.sam_checkpoint
    if (args.segmenter or settings.segmenter) == "sam" and sam_checkpoint is not None and not Path(sam_checkpoint).is_file():
        raise CLIError(f"SAM checkpoint not found: {sam_checkpoint}")
    check_model_argument(settings, args.model)
    wiring.check_precision(settings, device=args.device, dtype=args.dtype)  # float16 on a CPU: before anything else
    _check_before_work(args, settings, model)

    layout = _read_layout(args.layout) if args.layout else _plan(args.prompt, settings)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    result = _render(args, settings, layout, seed)
    out = args.out or default_out_dir()
    try:
        parameters = result.parameters(prompt=args.prompt, preset=args.preset or settings.preset, negative_prompt=args.negative)
        out = result.save(out, parameters)
    except OSError as exc:
        raise CLIError(f"cannot write to {out}: {exc}") from None
    _print_summary(result, out, seed)
    return 0


def check_model_argument(settings, model: str | None) -> None:
    """``--model``: a name of LMD_MODELS, an existing path, or a hub id (owner/name); else one line."""
    from lmd import hub

    if model is None or model in settings.models or Path(model).expanduser().exists() or hub.is_hub_id(model):
        return
    names = f"LMD_MODELS has: {', '.join(settings.models)}; " if settings.models else ""
    raise CLIError(f"model not found: {model} ({names}give a name of LMD_MODELS, a hub id, a diffusers directory "
                   "or a .safetensors/.ckpt file)")


def default_out_dir(root: Path = Path("outputs")) -> Path:
    """A new ``outputs/YYYYMMDD-HHMMSS`` (``-2``, ``-3``... when taken): a run never overwrites another's files."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def _check_before_work(args: argparse.Namespace, settings, model: str) -> None:
    """Everything that can be known to fail, before the LLM is asked (a paid request) or a model
    loads: the conditioning's files and GlueNet's language, the hub (reachable, or the local cache
    has every model), the variant against the UNet's config, the LLM endpoint (reachable)."""
    from grounded_sd import GroundedSDError
    from grounded_sd.preflight import check_conditioning, check_variant
    from lmd import hub

    for choice in args.loras:
        if not Path(choice.path).expanduser().is_file() or not choice.path.endswith(".safetensors"):
            raise CLIError(f"--lora {choice.name}: LMD_LORAS names {choice.path}, which is not a .safetensors file")
    conditioning = args.conditioning or settings.conditioning
    config = wiring.conditioning_config(settings)
    try:  # the files first (a missing one needs no hub), then the hub, then the variant (may read the hub)
        args.language = check_conditioning(conditioning, config, source_prompt=args.prompt, language=args.language) or args.language
        planner = wiring.choose_planner(settings) if args.prompt and not args.layout else None
        refiner = None if args.no_refiner else args.refiner or settings.refiner
        hub.prepare([
            hub.model_source("the diffusion model", model, "--model" if args.model else "LMD_SD_MODEL"),
            hub.model_source("the layout planner model", planner.model, "LMD_LOCAL_LLM_MODEL") if planner and planner.kind == "local" else None,
            hub.model_source("the refiner", refiner, "--refiner" if args.refiner else "LMD_REFINER"),
            *hub.conditioning_sources(conditioning, config),
        ])
        check_variant(model, args.variant or settings.variant)
    except GroundedSDError as exc:
        raise CLIError(str(exc)) from None


def _check_arguments(args: argparse.Namespace) -> None:
    if bool(args.prompt) == bool(args.layout):
        raise CLIError("give either a PROMPT or --layout JSON (not both)")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise CLIError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if args.language:
        from layout_planner.language import normalize_language

        try:
            args.language = normalize_language(args.language)
        except ValueError as exc:
            raise CLIError(f"--language: {exc}") from None


def _render(args: argparse.Namespace, settings, layout, seed: int):
    """Stage 2: the options, the pipeline and the run; every failure a one-line CLIError."""
    import torch

    from grounded_sd import GenerationCanceled, GroundedSDError

    try:
        options = wiring.render_options(settings, args.preset or settings.preset, steps=args.steps,
                                        guidance_scale=args.guidance_scale, max_batch=args.max_batch,
                                        guidance_checkpointing=args.guidance_checkpointing,
                                        conditioning_mode=args.conditioning_mode,
                                        conditioning_negative=args.conditioning_negative)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CLIError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    try:
        refiner_options = wiring.refiner_options(settings, args.refiner_strength)
    except ValidationError as exc:
        raise CLIError(f"--refiner-strength: {exc.errors()[0]['msg']}") from None
    try:
        pipe = wiring.load_pipeline(
            settings, model=args.model, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
            sam_checkpoint=args.sam_checkpoint, sam_model_type=args.sam_model_type, segmenter=args.segmenter,
        )
        refiner = None if args.no_refiner else wiring.load_refiner(settings, model=args.refiner, device=args.device, dtype=args.dtype)
    except (GroundedSDError, RuntimeError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None

    bars = _StageBars(enabled=not args.quiet)
    try:
        conditioning = wiring.conditionings(settings, pipe).get(args.conditioning or settings.conditioning)
        result = pipe(
            layout, seed=seed, options=options, variant=args.variant or settings.variant, width=args.width, height=args.height,
            negative_prompt=args.negative, progress=bars, conditioning=conditioning, source_prompt=args.prompt, language=args.language,
            loras=args.loras,
        )
        if refiner is not None:
            result = refiner.refine(result, options=refiner_options, progress=bars)
        return result
    except GenerationCanceled:
        raise CLIError("canceled") from None
    except torch.cuda.OutOfMemoryError:
        raise CLIError("out of GPU memory: lower --max-batch (LMD_MAX_BATCH), add --guidance-checkpointing, or lower --width/--height or the number of objects") from None
    except GroundedSDError as exc:
        raise CLIError(str(exc)) from None
    finally:
        bars.close()


def _print_summary(result, out: Path, seed: int) -> None:
    report = result.report
    print(f"wrote {out}/image.png, overlay.png, masks/ ({len(result.masks)}), layout.json, report.json")
    conditioning = report.conditioning if report.conditioning == "clip" else f"{report.conditioning} ({report.conditioning_mode})"
    print(f"seed {seed}, variant {report.variant}, conditioning {conditioning}, {report.steps} steps, "
          f"{report.wall_s:.1f} s on {report.device} ({report.dtype})")
    for obj in report.objects:
        energy = obj.per_box_energy
        line = f"  {obj.id}: {obj.phrase!r} mask {obj.mask_source or '-'}"
        if energy.start is not None and energy.after_first_step is not None:
            line += f", per-box energy {energy.start:.2f} -> {energy.after_first_step:.2f} (first guided step)"
        elif energy.start is not None:  # the fast preset skips the measurement after the updates
            line += f", per-box energy {energy.start:.2f} at the first guided step"
        print(line)
    if report.loras:
        print("  LoRA: " + ", ".join(f"{lora.name} x{lora.weight:g}" for lora in report.loras))
    if report.refiner is not None:
        refined = report.refiner
        print(f"  refined with {refined.model}: strength {refined.strength:g}, {refined.steps} steps, {refined.width}x{refined.height}")
    for note in report.notes:
        print(f"  note: {note}")
