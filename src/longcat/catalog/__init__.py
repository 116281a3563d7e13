"""Data files that ship inside the package, so an installed longcat finds them from any directory:

    hardware/*.toml     accelerators for the planner (`longcat plan hardware` lists them)
    plan/*.toml         model architectures the planner knows by name (gpt3-175b, deepseek-v3, ...)
    validation/*.toml   published training runs the planner is checked against (`longcat plan validate`)
    engines/*.toml      serving engines' memory layouts (`longcat plan serve --engine`)

A user folder ($LONGCAT_CONFIG_DIR, else $XDG_CONFIG_HOME/longcat, else ~/.config/longcat) holds
files of the same kinds that take precedence over the packaged ones: `longcat plan calibrate`
writes there, because an installed package's folder may be read-only and is replaced on upgrade.
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("hardware", "plan", "validation", "engines")


def catalog_dir(kind: str) -> Path:
    """The folder of one kind of catalog file."""
    if kind not in KINDS:
        raise ValueError(f"unknown catalog kind {kind!r}; choose one of {', '.join(KINDS)}")
    # Relative to this file rather than the working directory or a repository root: the same
    # lookup works for a checkout, an editable install and a wheel in site-packages.
    return Path(__file__).resolve().parent / kind


def user_dir(kind: str) -> Path:
    """The user's folder of one kind of catalog file (may not exist yet)."""
    if kind not in KINDS:
        raise ValueError(f"unknown catalog kind {kind!r}; choose one of {', '.join(KINDS)}")
    if os.environ.get("LONGCAT_CONFIG_DIR"):
        base = Path(os.environ["LONGCAT_CONFIG_DIR"]).expanduser()
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser() / "longcat"
    return base / kind


def catalog_file(kind: str, name: str) -> Path | None:
    """NAME.toml of one kind: the user's copy if there is one, else the packaged one, else None."""
    for folder in (user_dir(kind), catalog_dir(kind)):
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    return None


def catalog_names(kind: str) -> list[str]:
    """File stems of one kind, sorted: the names the command line accepts (user and packaged)."""
    names = {p.stem for p in catalog_dir(kind).glob("*.toml")}
    names |= {p.stem for p in user_dir(kind).glob("*.toml")}
    return sorted(names)


__all__ = ["KINDS", "catalog_dir", "catalog_file", "catalog_names", "user_dir"]
