"""`longcat bench serve`: a load generator against any OpenAI-compatible server (issue 18; in progress)."""

from __future__ import annotations

import argparse


def register(bench: argparse._SubParsersAction) -> None:
    """Add `bench serve` to the `longcat bench` subcommands."""
