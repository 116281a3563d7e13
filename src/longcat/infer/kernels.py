"""Hand-written CPU kernels for decoding, built on first use with the machine's C++ compiler.

`longcat::rows_linear(x, w)`: x (rows, in) @ w (out, in).T for 1-8 float32 rows, the few-row weight
product of a batched decode step, with a software prefetch of the weights that inductor's generated
loops lack (csrc/rows_linear.cpp says why it matters). The compiled decode step (compiled.py) calls
it for 4-8 rows (`compiled.KERNEL_ROWS`) when it is available; otherwise the step keeps its
generated loops.

The build needs what the compiled step needs anyway (a C++ compiler, as inductor uses) and an x86
CPU with AVX2+FMA or AVX-512. It takes about ten seconds once; the library is cached under
`$LONGCAT_CACHE_DIR/kernels` (default `~/.cache/longcat/kernels`), keyed by the source, torch version, compiler and
CPU. `LONGCAT_CPU_KERNELS=0` turns the kernels off. If the build fails, a warning says why, once,
and decoding goes on without them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "rows_linear.cpp"
MAX_ROWS = 8  # rows the kernel handles (a compile-time accumulator count per row count)

_lock = threading.Lock()
_enabled: bool | None = None  # None until rows_linear_enabled() ran; read (not built) while torch.compile traces
_why: str | None = None  # why not, when not


def cache_dir() -> Path:
    from ..data.tokens import default_cache_dir  # $LONGCAT_CACHE_DIR, else $XDG_CACHE_HOME/longcat, ...

    return default_cache_dir() / "kernels"


def _compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # the compiler inductor itself uses

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - an internal helper; fall back to the usual names
        return os.environ.get("CXX") or "g++"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def unsupported_reason() -> str | None:
    """Why the kernels cannot be built here, or None."""
    if os.environ.get("LONGCAT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "turned off by LONGCAT_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"x86 only (this CPU is {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"needs AVX2 or AVX-512 (torch reports {capability})"
    return None


def _build(compiler: str) -> Path:
    """The kernel library for this machine, compiled unless cached; raises RuntimeError on failure."""
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = library_paths()[0]
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{p}" for p in include_paths())]
    libs = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    key = "\n".join([SOURCE.read_text(), torch.__version__, compiler, *flags, *libs,
                     torch.backends.cpu.get_cpu_capability(), platform.machine(), _cpu_model()])
    target = cache_dir() / f"rows_linear-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler '{compiler}' on PATH (set CXX, or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *flags, str(SOURCE), "-o", str(built), *libs]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"{compiler} did not run: {error}") from None
        if done.returncode != 0:
            tail = " ".join(done.stderr.strip().splitlines()[-3:])[-400:]
            raise RuntimeError(f"{compiler} failed (exit {done.returncode}): {tail}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    return target


def _registered() -> bool:
    try:
        torch.ops.longcat.rows_linear  # noqa: B018 - raises when the library is not loaded
        return True
    except (AttributeError, RuntimeError):
        return False


def rows_linear_enabled() -> bool:
    """Whether `torch.ops.longcat.rows_linear` can be used; builds and loads it on the first call.
    A failed build warns once (RuntimeWarning, with the reason) and returns False from then on."""
    global _enabled, _why
    if _enabled is not None:
        return _enabled
    with _lock:
        if _enabled is None:
            why = unsupported_reason()
            if why is None and not _registered():
                try:
                    torch.ops.load_library(str(_build(_compiler())))
                except (RuntimeError, OSError) as error:
                    why = str(error)
                    warnings.warn(f"longcat: the CPU decode kernel could not be built ({why}); decoding uses "
                                  "generated loops instead (same results, slower at 4 or more rows)",
                                  RuntimeWarning, stacklevel=3)
            _why, _enabled = why, why is None
    return _enabled


def disabled_reason() -> str | None:
    """Why rows_linear is not in use (after rows_linear_enabled() was called), or None."""
    return _why


def rows_linear_applies(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Whether x (viewed as `rows` rows) @ w.T can run through the kernel. Builds nothing (it runs
    inside torch.compile's tracing): call rows_linear_enabled() first, outside the compiled code."""
    return (_enabled is True and 1 <= rows <= MAX_ROWS and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous())


def _reset_for_tests() -> None:
    global _enabled, _why
    _enabled = _why = None


__all__ = ["rows_linear_enabled", "rows_linear_applies", "disabled_reason", "unsupported_reason", "cache_dir"]
