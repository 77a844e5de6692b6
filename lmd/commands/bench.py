"""``lmd bench``: wall time, memory and UNet work of LMD against plain SD (see BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from grounded_sd.names import DTYPES, GROUNDED_VARIANTS, PRESETS
from lmd.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure what LMD costs over plain SD (time, memory, UNet passes)",
        description=(
            "Plain SD, then LMD with 1-4 objects for each variant and preset, same steps, size and seed. "
            "Without --model, a random-weight model of SD 1.x's shape is built in-process (timings only)."
        ),
    )
    parser.add_argument("--model", help="a name of LMD_MODELS, a hub id, a local diffusers directory or a single-file "
                        "checkpoint (default: random SD-shaped model)")
    parser.add_argument(
        "--real-size", action="store_true",
        help="without --model: a random model of SD 1.5's exact architecture and CLIP tokenizer (minutes per run on a CPU)",
    )
    parser.add_argument(
        "--clip-vocab", metavar="PATH",
        help="--real-size: the open-clip-torch wheel (pip download --no-deps open-clip-torch) or its "
             "bpe_simple_vocab_16e6.txt.gz; default: the installed open_clip package's",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--width", type=int, default=256, help="image width, multiple of 8 (default 256)")
    parser.add_argument("--height", type=int, default=256, help="image height, multiple of 8 (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 2, 3, 4], help="object counts (default 1 2 3 4)")
    parser.add_argument("--variants", nargs="+", choices=GROUNDED_VARIANTS, default=list(GROUNDED_VARIANTS), help="default: both")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS), help="default: both")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--conditioning", default="clip",
        help="also measure every LMD run with this conditioning (ella, gluenet, connector:PATH): its cost over CLIP; "
             "the random model gets random encoders, a --model the LMD_ELLA_*/LMD_GLUENET_* files",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    parser.set_defaults(handler=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    from lmd import wiring
    from lmd.bench import BenchConfig, format_table, run_bench

    model = wiring.model_source(wiring.load_settings(), args.model) if args.model else None  # an LMD_MODELS name, or as given
    try:
        config = BenchConfig(
            model=model, shape="sd15" if args.real_size else "sd", clip_vocab=args.clip_vocab, steps=args.steps, width=args.width, height=args.height, seed=args.seed, objects=args.objects,
            variants=args.variants, presets=args.presets, device=args.device, dtype=args.dtype, threads=args.threads,
            conditioning=args.conditioning,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CLIError(f"--{'-'.join(str(p) for p in first['loc'])}: {first['msg'].removeprefix('Value error, ')}") from None

    from tqdm import tqdm

    from grounded_sd import GroundedSDError
    from lmd import hub

    if config.model is not None:  # the hub answers, or the cache holds the model and files (else one line)
        hub.prepare([hub.model_source("the diffusion model", config.model, "--model"),
                     *hub.conditioning_sources(config.conditioning, wiring.conditioning_config(wiring.load_settings()))])

    runs = len(config.variants) * (1 + len(config.presets) * len(config.objects) * (1 if config.conditioning == "clip" else 2))
    with tqdm(total=runs, desc="bench", unit="run", file=sys.stderr) as bar:
        started = [0]

        def progress(name: str) -> None:  # told when a run starts: the previous one is done
            bar.update(min(started[0], 1))
            started[0] += 1
            bar.set_postfix_str(name)

        try:
            result = run_bench(config, progress=progress)
        except GroundedSDError as exc:
            raise CLIError(str(exc)) from None
        bar.update(1)
    text = result.model_dump_json(indent=2)
    if args.out:
        args.out.write_text(text)
    print(text if args.json else format_table(result))
    return 0
