"""`longcat serve` (issue 18; in progress)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `longcat serve` to the top-level commands."""
