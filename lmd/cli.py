"""Entry point of the ``lmd`` console script."""

from __future__ import annotations

import argparse
import importlib
import sys

from lmd.hub import HubUnreachable, network_failure
from lmd.wiring import SettingsError

# Each module holds related subcommands and a ``register(subparsers)`` function.
COMMAND_MODULES = (
    "lmd.commands.plan",
    "lmd.commands.service",
    "lmd.commands.evaluate",
    "lmd.commands.generate",
    "lmd.commands.bench",
    "lmd.commands.train_connector",
    "lmd.commands.info",
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2 (so are ``lmd.wiring.SettingsError``,
    ``lmd.hub.HubUnreachable`` and any failure to reach a host, see ``lmd.hub.network_failure``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmd", description="LLM-grounded diffusion: plan layouts, render them, serve them.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CLIError, SettingsError, HubUnreachable) as exc:
        print(f"lmd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = network_failure(exc)  # wherever a host could not be reached: one line, not a traceback
        if cause is None:
            raise
        print(f"lmd {args.command}: error: cannot reach {cause}; check the network, or set HF_HUB_OFFLINE=1 to "
              "load models from the local Hugging Face cache only", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
