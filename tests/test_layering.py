"""The package's imports point one way (DESIGN §6; docs/ARCHITECTURE.md, "Layers of the package").

Every module under src/longcat is parsed, not imported: every `import longcat...` and every
relative import counts, at module level, inside functions and under TYPE_CHECKING alike, since a
lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import longcat

ROOT = Path(longcat.__file__).parent

# Shared low-level modules: any layer from interop/ up may use them.
LOW = {"errors", "config", "devices", "catalog", "data", "telemetry"}
MIDDLE = {"train", "infer", "parallel", "reference"}

# What each top-level package or module of longcat may import from the rest of longcat. "longcat"
# is the package itself (`longcat.load`, `longcat.save_hf`): it re-exports interop, so it sits at
# interop's level. "__main__" is any `python -m` entry module, which nothing imports.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "catalog": set(),
    "config": {"errors"},
    "devices": {"errors", "config"},
    # the sampler of process/device counters that train, infer, serve and bench record
    "telemetry": {"errors", "devices"},
    "data": {"errors", "config"},
    "model": {"errors", "config"},
    "interop": {"model", *LOW},
    "longcat": {"config", "interop"},
    # train/ runs a local model or a parallel.ParallelModel: it builds on parallel/, never the reverse
    "parallel": {"model", "interop", "longcat", *LOW},
    "train": {"parallel", "model", "interop", "longcat", *LOW},
    "infer": {"model", "interop", "longcat", *LOW},
    "reference": {"model", "interop", "longcat", *LOW},
    # tiny checkpoints in the published layouts, written for tests and examples
    "testing": {"model", "interop", "longcat", *LOW},
    # the HTTP server runs the inference engine (and a parallel one with --nproc)
    "serve": {"infer", "parallel", "model", "interop", "longcat", *LOW},
    # evaluations run the engine over generated tasks
    "eval": {"infer", "parallel", "model", "interop", "longcat", *LOW},
    # bench/ measures the planner against real runs: bench -> plan, never plan -> bench
    "plan": {*MIDDLE, "model", "interop", "longcat", *LOW},
    "bench": {"plan", "serve", "eval", *MIDDLE, "model", "interop", "longcat", *LOW},
    "info": {"plan", *MIDDLE, "model", "interop", "longcat", *LOW},
    "cli": {"bench", "plan", "info", "serve", "eval", *MIDDLE, "model", "interop", "longcat", *LOW},
    "__main__": {"cli", "bench", "plan", "info", "serve", "eval", *MIDDLE, "model", "interop", "longcat", *LOW},
}

# model/ is pure PyTorch: no process groups, no files, no network, no other model libraries.
MODEL_FORBIDDEN = ("torch.distributed", "safetensors", "transformers", "huggingface_hub", "os", "pathlib",
                   "shutil", "pickle", "tempfile", "subprocess", "socket", "urllib", "requests")
MODEL_FORBIDDEN_CALLS = ("open", "torch.save", "torch.load")


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def unit(module: str) -> str:
    """The top-level package or module of longcat that `module` belongs to."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "longcat"


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(absolute module, imported name or None, line) for every import in `module`, any library."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def longcat_edges(module: str) -> list[tuple[str, str | None, int]]:
    """The longcat modules `module` imports: `from pkg import sub` counts as importing pkg.sub."""
    edges = []
    for source, name, line in imports(module):
        if source != "longcat" and not source.startswith("longcat."):
            continue
        target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else source
        edges.append((target, name, line))
    return edges


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_allowed_table_is_one_way_and_covers_the_package():
    graphlib.TopologicalSorter(ALLOWED).prepare()  # raises CycleError on a cycle
    units = {unit(m) for m in MODULES}
    assert units - set(ALLOWED) == set(), "place the new package in ALLOWED and in docs/ARCHITECTURE.md"
    assert all(deps <= set(ALLOWED) for deps in ALLOWED.values())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    src = unit(module)
    bad = []
    for target, _, line in longcat_edges(module):
        dst = unit(target)
        if dst == "__main__":
            bad.append(f"line {line}: {target} (an entry point; import what it runs instead)")
        elif dst != src and dst not in ALLOWED[src]:
            bad.append(f"line {line}: {target} ({src}/ may import {sorted(ALLOWED[src])})")
    assert not bad, f"{module} imports upward: " + "; ".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_packages(module):
    src = unit(module)
    bad = []
    for target, name, line in longcat_edges(module):
        if unit(target) == src:
            continue
        hidden = [part for part in target.split(".") if _is_private(part)]
        if name and _is_private(name):
            hidden.append(name)
        if hidden:
            bad.append(f"line {line}: {target} {hidden}")
    assert not bad, f"{module} imports private names of another package: " + "; ".join(bad)


def test_no_import_cycles_between_modules():
    graph = {m: {t for t, _, _ in longcat_edges(m) if t != m} for m in MODULES}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    # the two checkpoint formats are peers: both build on interop.materialize, neither on the other
    assert "longcat.interop.hf" not in graph["longcat.interop.native"], "interop.native imports interop.hf"
    assert "longcat.interop.native" not in graph["longcat.interop.hf"], "interop.hf imports interop.native"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if unit(m) == "model"))
def test_model_is_pure_pytorch(module):
    def forbidden(dotted: str) -> bool:
        return any(dotted == f or dotted.startswith(f + ".") for f in MODEL_FORBIDDEN)

    bad = {f"line {line}: import {source}" + (f".{name}" if name else "") for source, name, line in imports(module)
           if forbidden(source) or (name and forbidden(f"{source}.{name}"))}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Attribute) and _dotted(node) == "torch.distributed":
            bad.add(f"line {node.lineno}: torch.distributed")
        if isinstance(node, ast.Call) and _dotted(node.func) in MODEL_FORBIDDEN_CALLS:
            bad.add(f"line {node.lineno}: {_dotted(node.func)}()")
    assert not bad, f"{module} is not pure PyTorch (no distributed, no I/O): " + "; ".join(sorted(bad))
