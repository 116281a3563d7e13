"""Data files that ship inside the package, so an installed longcat finds them from any directory:

    hardware/*.toml     accelerators for the planner (`longcat plan hardware` lists them)
    plan/*.toml         model architectures the planner knows by name (gpt3-175b, deepseek-v3, ...)
    validation/*.toml   published training runs the planner is checked against (`longcat plan validate`)
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("hardware", "plan", "validation")


def catalog_dir(kind: str) -> Path:
    """The folder of one kind of catalog file."""
    if kind not in KINDS:
        raise ValueError(f"unknown catalog kind {kind!r}; choose one of {', '.join(KINDS)}")
    # Relative to this file rather than the working directory or a repository root: the same
    # lookup works for a checkout, an editable install and a wheel in site-packages.
    return Path(__file__).resolve().parent / kind


def catalog_names(kind: str) -> list[str]:
    """File stems of one kind, sorted: the names the command line accepts."""
    return sorted(p.stem for p in catalog_dir(kind).glob("*.toml"))


__all__ = ["KINDS", "catalog_dir", "catalog_names"]
