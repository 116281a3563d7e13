"""The validation toolkit's commands: `longcat bench run|oom|numerics|compare` (issue 19; in progress)."""

from __future__ import annotations

import argparse


def register(bench: argparse._SubParsersAction) -> None:
    """Add the validation toolkit's subcommands to `longcat bench`."""
