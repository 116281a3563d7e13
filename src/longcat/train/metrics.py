"""Training metrics: metrics.jsonl, TensorBoard, FLOP accounting, MFU, memory, loss-curve plot.

MFU = achieved model FLOP/s / peak FLOP/s. The model FLOPs per trained token are

    6 * (active matmul parameters) + 6 * L_attn * T * heads * (d_qk + d_v) / 2

- active matmul parameters: the routing-dependent active parameters of this step
  (`RouterStats.active_params_per_token`) minus the input embedding table (a lookup, no FLOPs),
  plus, when the MTP heads are trained, their layers and one more pass through the output head per
  depth. 6 = 2 (multiply-add) x 3 (forward + backward).
- attention: QK^T and PV per layer over T keys, halved because attention is causal;
  L_attn = 2 * num_layers (two sublayers per layer) + the MTP layers. The indexer's scores are
  not counted (small next to the rest at our sizes).

The peak is measured once at start (about a second) with square-GEMM benchmarks in the training
dtype (bf16 under autocast, else fp32) on the threads the run uses, unless `peak_tflops` is
given; see `measure_peak_flops`. Every record names it: `mfu_peak_flops` and `mfu_peak_source`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..model.count import count_parameters, mla_params


def flops_per_token(config: ModelConfig, seq_len: int, active_params: float, with_mtp: bool) -> float:
    """Training FLOPs per token (forward + backward), see the module docstring."""
    c = config
    matmul_params = active_params - c.vocab_size * c.hidden_size  # input embedding is a lookup
    attn_layers = 2 * c.num_layers
    if with_mtp and c.mtp_num_layers:
        per_mtp = 2 * c.hidden_size * c.hidden_size + mla_params(c) + 3 * c.hidden_size * c.ffn_hidden_size
        matmul_params += c.mtp_num_layers * (per_mtp + c.vocab_size * c.hidden_size)
        attn_layers += c.mtp_num_layers
    attention = 6 * attn_layers * seq_len * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) / 2
    return 6 * matmul_params + attention


def expected_active_params(config: ModelConfig) -> float:
    return count_parameters(config).active_params


def _gemm_rate(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) GEMM in `dtype`, over `seconds`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(2):
            a @ b
        sync()
        best = max(best, 2 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> tuple[float, str]:
    """Peak FLOP/s for the MFU denominator and a description of where it came from.

    The best of square GEMMs (1024 and 2048) in `dtype`. On a CPU with several threads the
    single-thread rate times the thread count is measured too and the larger one is taken: on
    shared cores the multi-thread measurement comes out low, which would inflate MFU.
    """
    name = str(dtype).replace("torch.", "")
    sizes = (1024, 2048)
    best = max(_gemm_rate(device, dtype, s, seconds / 4) for s in sizes)
    if device.type != "cpu":
        return best, f"measured {name} GEMM (best of 1024^3, 2048^3) on {device.type}"
    threads = torch.get_num_threads()
    source = f"measured {name} GEMM (best of 1024^3, 2048^3) on {threads} CPU thread(s)"
    if threads > 1:
        torch.set_num_threads(1)
        try:
            single = max(_gemm_rate(device, dtype, s, seconds / 4) for s in sizes)
        finally:
            torch.set_num_threads(threads)
        if single * threads > best:
            best = single * threads
            source = f"{threads} x measured 1-thread {name} GEMM (best of 1024^3, 2048^3)"
    return best, source


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


# ---------------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl (and TensorBoard when installed).

    On resume at step S the file is cut back to the records of steps <= S, so a run killed after
    its last checkpoint never leaves duplicate or orphan steps (a torn last line is dropped too).
    """

    def __init__(self, out_dir: Path, *, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: skip silently
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def plot_loss_curve(metrics_path: Path, out_png: Path) -> str | None:
    """Write the loss curve; return None on success or a note saying why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): loss-curve plot skipped"
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    if not train:
        return "no training records to plot"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return None


__all__ = [
    "MetricsLog", "flops_per_token", "expected_active_params", "measure_peak_flops", "peak_memory_gib",
    "plot_loss_curve", "read_metrics",
]
