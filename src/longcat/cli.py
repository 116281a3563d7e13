"""The `longcat` command. Each area registers its own subcommands; this file only wires them up.

Subcommand modules expose `register(subparsers)`, which adds parsers whose `func(args) -> int`
runs the command. Errors that are the user's (bad config, missing file) are printed as one line
with the fix, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = [
    "longcat.info",
    "longcat.train.cli",
    "longcat.data.cli",
    "longcat.infer.cli",
    "longcat.serve.cli",
    "longcat.interop.cli",
    "longcat.bench.cli",
    "longcat.plan.cli",
    "longcat.eval.cli",
    "longcat.train.parity_cli",  # `longcat parallel check`: it runs the Trainer, so it lives in train/
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcat",
        description="Train, run, serve and plan LongCat-class Mixture-of-Experts language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.errors import DataError
    from .interop.safetensors_io import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError, FileNotFoundError, DataError, CheckpointError) as exc:
        print(f"longcat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longcat {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`longcat ... | head`): stop quietly, and point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
