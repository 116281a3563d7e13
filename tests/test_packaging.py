"""The package as a user gets it: a wheel built from this tree works from any directory (its data
files travel inside it), the declared package data matches the files, and `longcat --help` lists
the commands that exist and no others."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "longcat"


def _package_data_patterns() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return project["tool"]["setuptools"]["package-data"]["longcat"]


def _data_files() -> set[Path]:
    """Every file of the package that is not Python source: what the wheel must carry as data."""
    return {p for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


def test_package_data_patterns_match_files_and_cover_every_data_file():
    patterns = _package_data_patterns()
    for pattern in patterns:
        assert list(PACKAGE.glob(pattern)), f"package-data pattern {pattern!r} in pyproject.toml matches no file"
    covered = {p for pattern in patterns for p in PACKAGE.glob(pattern)}
    missing = sorted(str(p.relative_to(PACKAGE)) for p in _data_files() - covered)
    assert not missing, f"data files no package-data pattern ships: {missing}"


def test_catalog_is_found_inside_the_package():
    from longcat.catalog import catalog_dir
    from longcat.plan.hardware import hardware_names
    from longcat.plan.validate import default_table

    for kind in ("hardware", "plan", "validation"):
        assert catalog_dir(kind).is_relative_to(PACKAGE)
    assert {"a100-80gb", "h100", "ascend-910c", "cpu-local"} <= set(hardware_names())
    assert default_table().is_file() and default_table().is_relative_to(PACKAGE)


def test_help_lists_every_registered_command_and_nothing_else(capsys):
    from longcat import cli

    for name in cli.COMMAND_MODULES:
        # build_parser skips a module that is missing; in this tree every listed one must exist,
        # or --help would silently drop a command the docs promise.
        importlib.import_module(name)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {action.dest for action in sub._choices_actions}
    assert listed == set(sub.choices), "a registered command has no --help line, or the reverse"
    for name in listed:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0 and f"usage: longcat {name}" in capsys.readouterr().out
    assert {"info", "train", "generate", "plan", "bench", "parallel"} <= listed
    assert {"serve", "convert", "eval"} <= listed


@pytest.mark.slow
def test_wheel_works_outside_the_checkout(tmp_path):
    # Build from a copy of the tracked layout, so a stale build/ or egg-info in the checkout can
    # neither leak files into the wheel nor hide missing ones.
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("longcat-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = set(zf.namelist())
    expected = {f"longcat/{p.relative_to(PACKAGE).as_posix()}" for p in _data_files()}
    assert expected <= shipped, sorted(expected - shipped)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"  # no repository above it, no ../shared beside it
    elsewhere.mkdir()
    # The project interpreter supplies torch and the other dependencies; PYTHONPATH puts the
    # installed wheel ahead of the editable checkout on sys.path.
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}"
        return done.stdout

    where = json.loads(run(sys.executable, "-c", "import json, longcat, longcat.catalog as c; "
                                                 "print(json.dumps([longcat.__file__, str(c.catalog_dir('plan'))]))"))
    assert all(Path(p).is_relative_to(site) for p in where), where

    longcat = str(site / "bin" / "longcat")  # the console script pip wrote for the wheel
    assert json.loads(run(longcat, "info", "longcat2", "--json"))["total_params"] == 1638616773376
    assert "days" in run(longcat, "plan", "train", "--model", "gpt3-175b", "--hardware", "a100-80gb",
                         "--chips", "1024", "--tokens", "300e9")
    tables = json.loads(run(longcat, "plan", "validate", "--no-search", "--json"))
    rows = tables["megatron_2021_table1.toml"]
    assert len(rows) == 10 and all(abs(r["error"]) <= 0.15 for r in rows) and tables["published_runs.toml"]
    assert json.loads(run(longcat, "plan", "serve", "--model", "deepseek-v3", "--hardware", "h200", "--chips", "16",
                          "--engine", "vllm", "--json"))["engine"] == "vllm"  # catalog/engines travels too
    assert "ascend-910c" in json.loads(run(longcat, "plan", "hardware", "--json"))
