"""Forward+backward throughput of our model vs transformers' LongcatFlash, side by side.

Both run the same configuration and the same weights (ours saved in the HF layout, loaded by
transformers), in the same process, interleaved round by round so that machine noise hits both
alike. The reported number is the ratio of median step times.
"""

from __future__ import annotations

import os
import statistics
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..reference import transformers_reference
from ..model import build_model, lm_losses
from .common import Timer, comparable_config


ONEDNN_KERNEL_CACHE = 16384


@dataclass
class BenchResult:
    precision: str
    tokens_per_step: int
    ours_s: float
    reference_s: float | None

    @property
    def ours_tokens_per_s(self) -> float:
        return self.tokens_per_step / self.ours_s

    @property
    def reference_tokens_per_s(self) -> float | None:
        return None if self.reference_s is None else self.tokens_per_step / self.reference_s

    @property
    def speedup(self) -> float | None:
        return None if self.reference_s is None else self.reference_s / self.ours_s


def _step(loss_fn, x: torch.Tensor, precision: str, timer: Timer) -> float:
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16-autocast" else nullcontext()
    t0 = timer()
    with ctx:
        loss = loss_fn(x)
    loss.backward()
    return timer() - t0


def run_model_bench(
    name: str = "small",
    *,
    batch: int = 8,
    seq_len: int = 256,
    rounds: int = 6,
    warmup: int = 2,
    precisions: tuple[str, ...] = ("fp32", "bf16-autocast"),
    with_reference: bool = True,
    threads: int | None = None,
    clock: str = "wall",
    device: torch.device | str = "cpu",
    overrides: dict | None = None,
    log=print,
) -> list[BenchResult]:
    if threads:
        torch.set_num_threads(threads)
    # On CPU, oneDNN keeps the kernels it builds per bf16 GEMM shape in one cache per process (1024
    # by default, read at its first use): transformers' expert loop makes a few thousand new shapes
    # per step, which would evict ours and bill their rebuilding to our steps. Room for both keeps
    # each model's cost its own.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_KERNEL_CACHE))
    device = torch.device(device)
    # "cpu" (process CPU time) is robust to other load on a shared machine; use it with threads=1.
    timer = Timer(clock, device)
    config = comparable_config(name, **(overrides or {}))
    # built on the CPU and then moved, so every device runs the same weights
    ours = build_model(config, seed=0)
    reference = transformers_reference(ours, log) if with_reference else None
    ours.to(device).train()
    if reference is not None:
        reference.to(device).train()
    # One extra token: inputs are the first seq_len, labels the next (each side's own loss API).
    x = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    # the training path: the head computes the loss block by block, never holding the logits
    ours_fwd = lambda t: lm_losses(ours(t[:, :-1], mtp=False, labels=t[:, 1:]), t[:, 1:])["lm"]  # noqa: E731
    # transformers' own training loss (it shifts labels inside)
    ref_fwd = (lambda t: reference(t[:, :-1], labels=t[:, :-1]).loss) if reference is not None else None  # noqa: E731

    results = []
    for precision in precisions:
        times: dict[str, list[float]] = {"ours": [], "ref": []}
        for r in range(warmup + rounds):
            for key, fwd, model in (("ours", ours_fwd, ours), ("ref", ref_fwd, reference)):
                if fwd is None:
                    continue
                model.zero_grad(set_to_none=True)
                dt = _step(fwd, x, precision, timer)
                if r >= warmup:
                    times[key].append(dt)
        res = BenchResult(
            precision,
            batch * seq_len,
            statistics.median(times["ours"]),
            statistics.median(times["ref"]) if times["ref"] else None,
        )
        line = f"{name} {precision:14s} ours {res.ours_tokens_per_s:9,.0f} tok/s"
        if res.speedup is not None:
            line += f" | transformers {res.reference_tokens_per_s:9,.0f} tok/s | ratio {res.speedup:.2f}x"
        log(line)
        results.append(res)
    return results
