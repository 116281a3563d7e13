"""What a benchmark ran on, recorded so that two reports can be compared (or refused).

`describe_environment()` is the report's `environment` section: host, CPU model and cores, memory,
accelerators (name, memory, driver and runtime), library versions, the project's git commit,
the environment variables that change speed or memory, and the exact command. `peak_flops()`
is the MFU denominator with the place it came from.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

GiB = 2**30

# Environment variables that change what a benchmark measures (threads, allocators, visible devices).
ENV_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "CUDA_", "PYTORCH_", "TORCH_", "NCCL_", "HCCL_",
                "ASCEND_", "HIP_", "ROCR_", "ZE_", "MALLOC_", "LD_PRELOAD", "LONGCAT_", "TOKENIZERS_PARALLELISM")
LIBRARIES = ("torch", "numpy", "transformers", "safetensors", "tokenizers", "triton", "torch_npu",
             "intel_extension_for_pytorch", "nvidia-ml-py", "psutil", "longcat")


def cpu_model() -> str | None:
    """The CPU's marketing name (/proc/cpuinfo on Linux, sysctl on macOS), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    return platform.processor() or None


def cpu_flags() -> list[str]:
    """The CPU features that decide which kernels torch runs (bf16/fp16/AMX/NEON...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")
    return sorted(f for f in flags if f in wanted)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> dict[str, Any]:
    """The commit of the longcat source that ran and whether it had local changes; null with a reason
    when longcat is not a git checkout (an installed wheel)."""
    import longcat

    root = Path(longcat.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                              check=False)
        if head.returncode:
            return {"commit": None, "reason": "longcat is not run from a git checkout"}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "reason": f"git is not usable here: {exc}"}
    changed = [line for line in status.stdout.splitlines() if line.strip()]
    return {"commit": head.stdout.strip(), "modified_files": len(changed)}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # not installed, or no NVIDIA driver
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def accelerators() -> list[dict[str, Any]]:
    """Every accelerator torch sees: name, memory, driver and runtime versions."""
    found = []
    if torch.cuda.is_available():
        hip = getattr(torch.version, "hip", None)
        driver = None if hip else _nvidia_driver()
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append({
                "type": "cuda", "index": i, "name": props.name, "memory_gib": props.total_memory / GiB,
                "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                "runtime": f"HIP {hip}" if hip else f"CUDA {torch.version.cuda}",
                "driver": driver, **({} if driver or hip else {"driver_reason": "neither nvidia-ml-py nor nvidia-smi "
                                                                                 "answered"}),
            })
    for kind in ("xpu", "npu", "mps"):
        backend = getattr(torch, kind, None)
        if kind == "npu":
            try:
                import torch_npu  # noqa: F401  (Ascend NPUs are a torch device type once it is imported)
            except ImportError:
                continue
            backend = getattr(torch, "npu", None)
        if backend is None or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
            continue
        count = backend.device_count() if callable(getattr(backend, "device_count", None)) else 1
        for i in range(count):
            entry: dict[str, Any] = {"type": kind, "index": i}
            name = getattr(backend, "get_device_name", None)
            entry["name"] = name(i) if callable(name) else kind
            props = getattr(backend, "get_device_properties", None)
            try:
                total = getattr(props(i), "total_memory", None) if callable(props) else None
            except Exception:
                total = None
            entry["memory_gib"] = total / GiB if total else None
            if total is None:
                entry["memory_reason"] = f"torch.{kind} does not report the device memory"
            entry["runtime"] = {"xpu": f"torch.xpu {getattr(torch.version, 'xpu', '')}".strip(),
                                "npu": "torch_npu " + (library_versions().get("torch_npu") or "?"),
                                "mps": f"macOS {platform.mac_ver()[0]}"}[kind]
            entry["driver"] = None
            entry["driver_reason"] = f"not reported through torch.{kind}"
            found.append(entry)
    return found


def environment_variables() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def memory_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / GiB
    except ImportError:
        return None


def describe_environment(argv: list[str] | None = None) -> dict[str, Any]:
    """The report's `environment` section (the MFU denominator is added by the caller, who knows the device)."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    uname = platform.uname()
    return {
        "host": {"name": uname.node, "os": f"{uname.system} {uname.release}", "machine": uname.machine,
                 "python": sys.version.split()[0]},
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical,
                "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "features": cpu_flags(), "torch_threads": torch.get_num_threads()},
        "memory_gib": memory_gib(),
        "accelerators": accelerators(),
        "versions": library_versions(),
        "git": git_commit(),
        "environment_variables": environment_variables(),
        "command": shlex.join(["longcat", *(sys.argv[1:] if argv is None else argv)]),
        "load_average": load_average(),
    }


# --- the MFU denominator ---------------------------------------------------------------------------

# catalog entry -> a pattern that names it in torch's device name; longest names first ("h20" is in "h200")
_CATALOG_PATTERNS = [("a100-80gb", r"a100.*80"), ("ascend-910c", r"910c"), ("ascend-910b", r"910b"),
                     ("b200", r"\bb200\b"), ("h200", r"\bh200\b"), ("h800", r"\bh800\b"), ("h100", r"\bh100\b"),
                     ("h20", r"\bh20\b")]


def catalog_entry_for(device_name: str) -> str | None:
    """The planner's hardware entry whose vendor peak applies to this device, if there is one."""
    low = device_name.lower()
    for entry, pattern in _CATALOG_PATTERNS:
        if re.search(pattern, low):
            return entry
    return None


def peak_flops(device: torch.device, *, hardware=None, user_tflops: float | None = None) -> dict[str, Any]:
    """The peak bf16 FLOP/s for MFU and where it came from, in order: the user's number; the
    planner's hardware entry (`hardware`, a loaded `plan.Hardware`, e.g. this run's calibration:
    its provenance says vendor or measured); the catalog entry that names this accelerator; a
    square-GEMM measurement on `device` now."""
    if user_tflops:
        return {"peak_flops": user_tflops * 1e12, "source": "--peak-tflops (user-given)"}
    if hardware is not None:
        prov = hardware.provenance.get("peak_tflops_bf16", "default")
        note = hardware.notes.get("peak_tflops_bf16", "")
        return {"peak_flops": hardware.peak_tflops_bf16 * 1e12,
                "source": f"hardware entry '{hardware.name}' peak_tflops_bf16 ({prov}{': ' + note if note else ''})"}
    if device.type == "cuda":
        entry = catalog_entry_for(torch.cuda.get_device_name(device))
        if entry is not None:
            from ..plan.hardware import load_hardware

            hw = load_hardware(entry)
            return {"peak_flops": hw.peak_tflops_bf16 * 1e12,
                    "source": f"catalog entry '{entry}' peak_tflops_bf16 ({hw.provenance.get('peak_tflops_bf16')})"}
    from ..train.metrics import measure_peak_flops

    flops, source = measure_peak_flops(device, torch.bfloat16)
    return {"peak_flops": flops, "source": source}


__all__ = ["accelerators", "catalog_entry_for", "cpu_model", "describe_environment", "git_commit", "library_versions",
           "load_average", "peak_flops"]
