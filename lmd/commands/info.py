"""``lmd info IMAGE.png``: the generation parameters an image carries in its PNG text chunks.

Prints them as JSON (prompt, layout, seed, steps, size, variant, preset, model, scheduler,
conditioning, version); ``--layout-out FILE`` also writes the layout, ready for
``lmd generate --layout FILE``. Needs no torch and no settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmd.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="print the generation parameters stored in a PNG",
        description="Read the generation parameters (lmd:* text chunks) of a PNG written by lmd generate or the "
                    "service, and print them as JSON.",
    )
    parser.add_argument("image", type=Path, help="a PNG written by lmd generate or the service")
    parser.add_argument("--layout-out", type=Path, metavar="JSON", help="also write the layout to this file")
    parser.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from grounded_sd.errors import NoImageParameters
    from grounded_sd.image_parameters import read_parameters

    if not args.image.is_file():
        raise CLIError(f"no such file: {args.image}")
    try:
        parameters = read_parameters(args.image)
    except NoImageParameters as exc:
        raise CLIError(str(exc)) from None
    if args.layout_out is not None:
        try:
            args.layout_out.write_text(parameters.layout.model_dump_json(indent=2))
        except OSError as exc:
            raise CLIError(f"cannot write {args.layout_out}: {exc.strerror}") from None
    print(json.dumps(parameters.model_dump(mode="json"), indent=2, ensure_ascii=False))
    return 0
