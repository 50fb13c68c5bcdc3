"""`coordinator` command line: the composition root of the upper layer.

Each subcommand lives in coordinator/commands/<name>.py and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from coordinator.errors import UserError

__all__ = ["UserError", "main"]

# Modules under coordinator.commands, in the order their commands appear in --help.
COMMAND_MODULES = (
    "up",
    "token",
    "chat",
    "run",
    "nodes",
    "probe",
    "plan",
    "synth_model",
    "export_gguf",
    "demo",
    "bench",
    "experiment",
    "validate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator",
        description="LayerLink coordinator: find nodes, plan, load stages and serve a model.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"coordinator.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"coordinator.commands.{name}":
                raise
            continue  # a command not shipped in this build
        module.register(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from node.memtune import keep_large_buffers

    keep_large_buffers()  # weight shipping moves bulk bytes: no mmap churn per piece
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except UserError as e:
        from coordinator.console import error

        error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
