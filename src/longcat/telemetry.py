"""What the machine did while something ran: a sampler thread over process and device counters.

    with Telemetry(device) as telemetry:
        ...                                   # training, decoding, a benchmark
    telemetry.summary()                        # peak/mean per field, energy, what each backend said
    telemetry.samples                          # one dict per sample (t_s and the fields below)

Fields (units in the names; a field whose counter does not exist here is left out of the samples
and named in `backends` with the reason):
- rss_bytes, cpu_percent (psutil; cpu_percent is this process over all its threads, so 2 busy
  threads read 200); with `children=True` also children_rss_bytes and children_cpu_percent, summed
  over the child processes alive at each reading;
- device_memory_bytes, device_memory_reserved_bytes: the torch allocator of `device` (CUDA/ROCm,
  XPU, MPS, NPU: whatever `torch.<type>` reports);
- power_w, utilization_percent, sm_clock_mhz, memory_used_bytes, gpu_energy_j: NVIDIA GPUs through NVML
  (`nvidia-ml-py`, imported only when present); power_w and utilization_percent of Ascend NPUs
  through `npu-smi`;
- cpu_energy_j from RAPL (/sys/class/powercap/intel-rapl:N/energy_uj, the CPU packages) when readable:
  it counts the whole package, every process on it, not this process alone.

The energy fields are counters: `summary()["energy_j"]` is their increase between start and stop
(wrap-around handled), summed over the counters present, or null with the reason when none is.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

GiB = 2**30
RAPL_ROOT = Path("/sys/class/powercap")
PROC_STATUS = "/proc/self/status"  # Linux: this process's memory counters, VmHWM among them
# counters of joules since some origin: a run's energy is their increase (GPU board + CPU packages)
ENERGY_COUNTERS = {"gpu_energy_j": "NVML total energy (GPU board)", "cpu_energy_j": "RAPL (CPU packages, all processes)"}


def peak_rss() -> tuple[int, str]:
    """(bytes, counter): this process's own peak resident set, and which counter gave it.

    On Linux that is `VmHWM` of /proc/self/status ("VmHWM"): the high-water mark of this process
    alone. Elsewhere it falls back to `getrusage(RUSAGE_SELF).ru_maxrss` ("ru_maxrss"), which on
    Linux would also carry the RSS of the process that forked this one (a fork starts with its
    parent's resident pages counted), so a small child of a large parent would read large."""
    try:
        with open(PROC_STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"  # "VmHWM:   123456 kB"
    except OSError:  # not Linux (or no procfs mounted)
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "ru_maxrss"  # bytes on macOS, KiB elsewhere


# --- backends: each reads a few fields; `reason` is None when it works -----------------------------------


class _Process:
    name = "process"

    def __init__(self, children: bool = False) -> None:
        self.children = children
        self._kids: dict[int, Any] = {}  # pid -> psutil.Process: cpu_percent measures since its previous call
        try:
            import psutil
        except ImportError:
            self.proc, self.reason = None, "psutil is not installed (pip install psutil)"
            return
        self.proc, self.reason = psutil.Process(), None
        self.proc.cpu_percent(None)  # the first call starts the interval the next one measures

    def read(self) -> dict[str, float]:
        if self.proc is None:
            return {}
        out = {"rss_bytes": float(self.proc.memory_info().rss), "cpu_percent": self.proc.cpu_percent(None)}
        if self.children:
            import psutil

            rss = cpu = 0.0
            alive = {}
            for kid in self.proc.children(recursive=True):
                kid = self._kids.get(kid.pid, kid)
                try:
                    rss += kid.memory_info().rss
                    cpu += kid.cpu_percent(None)
                except psutil.Error:  # it ended between the listing and the reading
                    continue
                alive[kid.pid] = kid
            self._kids = alive
            out["children_rss_bytes"], out["children_cpu_percent"] = rss, cpu
        return out


class _TorchDevice:
    name = "device_memory"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.backend = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
        if self.backend is None:
            self.reason = f"{device.type}: no device allocator (host memory is rss_bytes)"
        elif device.type == "mps":
            self.reason = None if hasattr(self.backend, "current_allocated_memory") else "torch.mps reports no memory"
        else:
            self.reason = None if callable(getattr(self.backend, "memory_allocated", None)) else \
                f"torch.{device.type} has no memory_allocated"

    def read(self) -> dict[str, float]:
        if self.reason is not None:
            return {}
        if self.device.type == "mps":
            out = {"device_memory_bytes": float(self.backend.current_allocated_memory())}
            driver = getattr(self.backend, "driver_allocated_memory", None)
            if callable(driver):
                out["device_memory_reserved_bytes"] = float(driver())
            return out
        out = {"device_memory_bytes": float(self.backend.memory_allocated(self.device))}
        reserved = getattr(self.backend, "memory_reserved", None)
        if callable(reserved):
            out["device_memory_reserved_bytes"] = float(reserved(self.device))
        return out


class _NVML:
    name = "nvml"

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        if device.type != "cuda" or getattr(torch.version, "hip", None):
            self.reason = "not an NVIDIA GPU"
            return
        try:
            import pynvml  # the nvidia-ml-py package
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            # NVML numbers every GPU; CUDA_VISIBLE_DEVICES renumbers them for torch
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            if ids and index < len(ids) and ids[index].isdigit():
                index = int(ids[index])
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # NVMLError and its many subclasses
            self.reason = f"NVML failed: {exc}"
            return
        self.nvml, self.reason = pynvml, None

    def _try(self, fn: Callable[[], float]) -> float | None:
        try:
            return float(fn())
        except Exception:  # a counter this GPU or driver does not have
            return None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        values = {
            "power_w": self._try(lambda: n.nvmlDeviceGetPowerUsage(h) / 1e3),
            "utilization_percent": self._try(lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
            "sm_clock_mhz": self._try(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
            "memory_used_bytes": self._try(lambda: n.nvmlDeviceGetMemoryInfo(h).used),
            "gpu_energy_j": self._try(lambda: n.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3),
        }
        return {k: v for k, v in values.items() if v is not None}


def parse_npu_smi(text: str) -> dict[str, float]:
    """`npu-smi info -t power|usages -i N` output ("Key : value" lines) -> power_w, utilization_percent."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        try:
            number = float(value.strip().split()[0])
        except (ValueError, IndexError):
            continue
        key = key.strip().lower()
        if "power" in key and "power_w" not in out:
            out["power_w"] = number
        elif "aicore usage" in key and "utilization_percent" not in out:
            out["utilization_percent"] = number
    return out


class _NpuSmi:
    name = "npu-smi"

    def __init__(self, device: torch.device) -> None:
        self.exe = shutil.which("npu-smi") if device.type == "npu" else None
        self.index = device.index or 0
        if device.type != "npu":
            self.reason = "not an Ascend NPU"
        elif self.exe is None:
            self.reason = "npu-smi is not on PATH"
        else:
            self.reason = None

    def read(self) -> dict[str, float]:
        if self.exe is None:
            return {}
        out: dict[str, float] = {}
        for kind in ("power", "usages"):
            try:
                text = subprocess.run([self.exe, "info", "-t", kind, "-i", str(self.index)], capture_output=True,
                                      text=True, timeout=5, check=False).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            out.update(parse_npu_smi(text))
        return out


def rapl_domains(root: Path = RAPL_ROOT) -> list[Path]:
    """The top-level RAPL package domains (intel-rapl:0, intel-rapl:1, ...), not their sub-zones."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)


class _RAPL:
    name = "rapl"

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        self.domains: list[tuple[Path, float]] = []
        domains = rapl_domains(root)
        if not domains:
            self.reason = f"no RAPL counters under {root} (not an x86 Linux host with powercap, or a VM)"
            return
        for d in domains:
            try:
                (d / "energy_uj").read_text()
                wrap = float((d / "max_energy_range_uj").read_text()) if (d / "max_energy_range_uj").exists() else 0.0
            except OSError:
                self.reason = f"{d / 'energy_uj'} is not readable (root only on most kernels)"
                self.domains = []
                return
            self.domains.append((d, wrap))
        self.reason = None
        self.total_j = 0.0
        self._last = [float((d / "energy_uj").read_text()) for d, _ in self.domains]
        self._lock = threading.Lock()  # the sampler thread and a caller's read() both advance the total

    def read(self) -> dict[str, float]:
        if not self.domains:
            return {}
        with self._lock:
            return self._advance()

    def _advance(self) -> dict[str, float]:
        for i, (d, wrap) in enumerate(self.domains):
            try:
                now = float((d / "energy_uj").read_text())
            except OSError:
                return {}
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped around
                delta += wrap
            self._last[i] = now
            self.total_j += delta / 1e6
        return {"cpu_energy_j": self.total_j}


# --- the sampler -------------------------------------------------------------------------------------


class Telemetry:
    """A daemon thread that samples every `interval_s` seconds between start() and stop().

    Samples are kept up to `max_samples`; past that every other one is dropped and the stride
    doubles, so a long run keeps an even, bounded record. `summary()` folds in every reading,
    dropped or not.
    """

    def __init__(self, device: torch.device | str = "cpu", *, interval_s: float = 0.5, max_samples: int = 4096,
                 rapl_root: Path = RAPL_ROOT, children: bool = False) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.max_samples = max_samples
        self._rapl_root = rapl_root
        self.children = children  # also sum the RSS and CPU of child processes (children_rss_bytes, ...)
        self.samples: list[dict[str, float]] = []
        self._stride = 1
        self._count = 0
        self._stats: dict[str, list[float]] = {}  # field -> [peak, sum, n, last]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backends: list[Any] = []
        self._t0 = 0.0
        self.duration_s = 0.0
        self._since_mark: dict[str, float] = {}

    # --- life cycle
    def start(self) -> "Telemetry":
        if self._thread is not None:
            raise RuntimeError("telemetry already started")
        self._backends = [_Process(self.children), _TorchDevice(self.device), _NVML(self.device), _NpuSmi(self.device),
                          _RAPL(self._rapl_root)]
        self._t0 = time.perf_counter()
        self._stop.clear()
        self.sample()  # one reading at once, so even a short run has a first sample
        self._thread = threading.Thread(target=self._run, name="longcat-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "Telemetry":
        if self._thread is None:
            return self
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample()  # and one at the end
        self.duration_s = time.perf_counter() - self._t0
        return self

    def __enter__(self) -> "Telemetry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    # --- readings
    def read(self) -> dict[str, float]:
        """One reading of every working backend (no bookkeeping)."""
        values: dict[str, float] = {}
        for backend in self._backends:
            if backend.reason is None:
                try:
                    values.update(backend.read())
                except Exception:  # a counter that failed once: skip this reading, keep sampling
                    continue
        return {k: v for k, v in values.items() if isinstance(v, float) and math.isfinite(v)}

    def sample(self) -> dict[str, float]:
        values = self.read()
        record = {"t_s": time.perf_counter() - self._t0, **values}
        with self._lock:
            for key, value in values.items():
                stats = self._stats.setdefault(key, [value, 0.0, 0, value])
                stats[0] = max(stats[0], value)
                stats[1] += value
                stats[2] += 1
                stats[3] = value
                self._since_mark[key] = max(self._since_mark.get(key, value), value)
            if self._count % self._stride == 0:
                self.samples.append(record)
                if len(self.samples) > self.max_samples:
                    self.samples = self.samples[::2]
                    self._stride *= 2
            self._count += 1
        return record

    def latest(self) -> dict[str, float]:
        """The newest value of every field read so far (empty before start())."""
        with self._lock:
            return {k: s[3] for k, s in self._stats.items()}

    def backends(self) -> dict[str, str]:
        """Each backend: "ok" or why it reports nothing here."""
        return {b.name: "ok" if b.reason is None else b.reason for b in self._backends}

    def record_fields(self) -> dict[str, float | None]:
        """Fields for a per-step record (metrics.jsonl): the peak RSS and device memory since the
        previous call and the latest CPU share; device memory is null where the device has no
        allocator of its own (the CPU: host memory is the RSS)."""
        self.sample()
        with self._lock:
            peak, self._since_mark = self._since_mark, {}
            last = {k: s[3] for k, s in self._stats.items()}
        out: dict[str, float | None] = {
            "rss_gib": peak["rss_bytes"] / GiB if "rss_bytes" in peak else None,
            "cpu_percent": last.get("cpu_percent"),
            "device_mem_gib": peak["device_memory_bytes"] / GiB if "device_memory_bytes" in peak else None,
        }
        for key in ("power_w", *ENERGY_COUNTERS):
            if key in last:
                out[key] = last[key]
        return out

    def summary(self) -> dict[str, Any]:
        """Peak and mean of every field, energy over the run (null with a reason when unmeasured),
        what each backend said, the interval and how many readings were taken."""
        with self._lock:
            fields = {key: {"peak": s[0], "mean": s[1] / s[2], "last": s[3]} for key, s in self._stats.items()}
            readings = self._count
        energy_j, sources = None, []
        for key, source in ENERGY_COUNTERS.items():
            first = next((s[key] for s in self.samples if key in s), None)
            if key in fields and first is not None:
                energy_j = (energy_j or 0.0) + fields[key]["last"] - first
                sources.append(source)
        return {
            "interval_s": self.interval_s,
            "duration_s": self.duration_s or (time.perf_counter() - self._t0 if self._t0 else 0.0),
            "readings": readings,
            "samples_kept": len(self.samples),
            "backends": self.backends(),
            "fields": {k: v for k, v in fields.items() if k not in ENERGY_COUNTERS},
            "energy_j": energy_j,
            "energy_source": ", ".join(sources) if energy_j is not None else None,
            "energy_reason": None if energy_j is not None else
            "no energy counter here: " + "; ".join(f"{b.name}: {b.reason}" for b in self._backends
                                                    if b.name in ("nvml", "rapl") and b.reason),
        }


__all__ = ["ENERGY_COUNTERS", "GiB", "Telemetry", "parse_npu_smi", "peak_rss", "rapl_domains"]
