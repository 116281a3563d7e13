"""Where a training step goes: the demo's step split by part, each against this machine's peaks.

The step itself is the Trainer's (`Trainer.train_step`: forward, backward, clipping, optimizer,
router-bias update). To split it, one forward records every module call's inputs; each part is
then re-run on those inputs in isolation, forward and backward under the step's autocast, and
timed (median of repeats). A part's FLOPs come from `torch.utils.flop_counter` over the same run;
its bytes are a lower bound (inputs, outputs and their gradients, each touched once). What the
parts do not cover (residual adds, the MTP projection, router statistics, autograd bookkeeping,
gradient clipping) is the remainder, listed as "other".
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..model.attention import MLA
from ..model.layers import RMSNorm, SwiGLU
from ..model.moe import MoE
from ..model.ngram import NgramEmbedding
from .common import synchronize

# (part, module classes); a module inside a module of an earlier part belongs to that part
PART_MODULES: list[tuple[str, tuple[type, ...]]] = [
    ("attention (MLA, with its norms and indexer)", (MLA,)),
    ("MoE", (MoE,)),
    ("dense FFNs (SwiGLU)", (SwiGLU,)),
    ("norms (layer RMSNorms)", (RMSNorm,)),
    ("embeddings", (nn.Embedding, NgramEmbedding)),
]
MOE_INNER = ("router", "experts")  # MoE's Router and GroupedExperts, timed on their own


@dataclass
class Part:
    name: str
    seconds: float  # per step
    calls: int
    flops: float | None = None  # per step, forward + backward
    bytes: float | None = None  # per step, lower bound
    share: float = 0.0
    flops_per_s: float | None = None
    bytes_per_s: float | None = None
    peak_fraction: float | None = None  # of the GEMM peak (FLOP-bound parts) or of the bandwidth (the rest)


@dataclass
class StepProfile:
    tokens_per_step: int
    step_s: float
    tokens_per_s: float
    model_flops_per_token: float
    mfu: float
    peak_flops: float
    peak_flops_source: str
    bandwidth_bytes_per_s: float
    precision: str
    threads: int
    parts: list[Part] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Recorder:
    """Forward pre-hooks that keep each call's (module, args, kwargs), detached from the graph."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list[tuple[nn.Module, tuple, dict]]] = defaultdict(list)
        self.handles = []
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            part = _part_of(module)
            if part is None or _inside_counted(name, model, owner):
                continue
            owner[id(module)] = part
            self.handles.append(module.register_forward_pre_hook(self._hook(part), with_kwargs=True))
        for module in model.modules():
            if isinstance(module, MoE):
                for inner in MOE_INNER:
                    child = getattr(module, inner)
                    self.handles.append(child.register_forward_pre_hook(self._hook(f"MoE/{inner}"), with_kwargs=True))
        self.handles.append(model.lm_head.register_forward_pre_hook(self._hook("lm head + loss"), with_kwargs=True))

    def _hook(self, part: str):
        def hook(module, args, kwargs):
            self.calls[part].append((module, _detach(args), _detach(kwargs)))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _part_of(module: nn.Module) -> str | None:
    for part, classes in PART_MODULES:
        if isinstance(module, classes):
            return part
    return None


def _inside_counted(name: str, model: nn.Module, owner: dict[int, str]) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if id(model.get_submodule(".".join(parts[:i]))) in owner:
            return True
    return False


def _detach(value):
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return t.requires_grad_(True) if t.is_floating_point() else t
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _grad_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.requires_grad else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _grad_tensors(v)]
    if is_dataclass(value):
        return [t for f in fields(value) for t in _grad_tensors(getattr(value, f.name))]
    return []


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if is_dataclass(value):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in fields(value))
    return 0


def _run_call(fn, args, kwargs) -> int:
    """Forward + backward of one recorded call; returns the bytes it touched (lower bound)."""
    out = fn(*args, **kwargs)
    outs = _grad_tensors(out)
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    moved = _tensor_bytes(args) + _tensor_bytes(kwargs) + _tensor_bytes(out)
    return 2 * moved  # the backward reads and writes about as much again


def _measure(fn_calls, device, autocast, repeats: int) -> tuple[float, float, float]:
    """(seconds, flops, bytes) of running every (fn, args, kwargs) once, forward + backward."""
    with autocast():
        for fn, args, kwargs in fn_calls:  # warm-up
            _run_call(fn, args, kwargs)
        counter = FlopCounterMode(display=False)
        with counter:
            moved = sum(_run_call(fn, args, kwargs) for fn, args, kwargs in fn_calls)
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            for fn, args, kwargs in fn_calls:
                _run_call(fn, args, kwargs)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), float(counter.get_total_flops()), float(moved)


def _lm_head_loss(head: nn.Linear, vocab: int):
    def run(x):
        logits = head(x)  # (B, T, V)
        labels = torch.randint(0, vocab, logits.shape[:-1], generator=torch.Generator().manual_seed(0)).to(x.device)
        return nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten())
    return run


def measure_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes/s of an out-of-place fp32 multiply on `mib` MiB buffers (read + write)."""
    x = torch.ones(mib * 2**18, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mul(x, 1.0001, out=y)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


class _RandomTokens:
    """A BatchSource of uniform random tokens (the step's cost does not depend on the text)."""

    def __init__(self, vocab: int, seq_len: int, batch: int, seed: int = 0) -> None:
        from ..data import PackedBatches

        tokens = np.random.default_rng(seed).integers(3, vocab, size=batch * (seq_len + 1) * 64, dtype=np.int64)
        self.inner = PackedBatches(tokens, seq_len, batch, seed=seed)
        self.seconds = 0.0

    def next_batch(self):
        t0 = time.perf_counter()
        batch = self.inner.next_batch()
        self.seconds += time.perf_counter() - t0
        return batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def profile_train_step(run, *, steps: int = 3, warmup: int = 2, repeats: int = 3, log=print) -> StepProfile:
    """Profile `run` (a `longcat.train.config.RunConfig`)'s training step."""
    from rich.console import Console

    from ..train.config import RunConfig
    from ..train.trainer import Trainer

    cfg = run.train
    batches = _RandomTokens(run.model.vocab_size, cfg.seq_len, cfg.micro_batch, cfg.seed)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(RunConfig(run.model, cfg.replace(progress=False)), out, batches=batches,
                          console=Console(stderr=True, quiet=True))
        model, device = trainer.model, trainer.device
        log(f"warm-up: {warmup} step(s), then {steps} measured")
        for _ in range(warmup):
            trainer.train_step()
        batches.seconds = 0.0
        records = [trainer.train_step() for _ in range(steps)]
        tokens = cfg.grad_accum * cfg.micro_batch * cfg.seq_len
        step_s = statistics.median(tokens / r["tokens_per_s"] for r in records)
        data_s = batches.seconds / max(1, steps)

        # one recorded forward, as the engine runs it
        recorder = _Recorder(model)
        inputs, labels = batches.next_batch()
        try:
            trainer.optimizers.zero_grad()
            trainer.engine.forward_backward(torch.as_tensor(inputs), torch.as_tensor(labels), trainer.weights)
        finally:
            recorder.remove()

        def amp():
            if trainer.autocast_dtype is None:
                return torch.autocast(device.type, enabled=False)
            return torch.autocast(device.type, dtype=trainer.autocast_dtype)

        timed: dict[str, tuple[float, float, float, int]] = {}
        for part, calls in recorder.calls.items():
            if part == "lm head + loss":  # the head computes its loss itself when given the labels
                fn_calls = [(m, a, kw) if "labels" in kw else (_lm_head_loss(m, run.model.vocab_size), a, kw)
                            for m, a, kw in calls]
            else:
                fn_calls = [(m, a, kw) for m, a, kw in calls]
            log(f"timing {part} ({len(calls)} call(s))")
            seconds, flops, moved = _measure(fn_calls, device, amp, repeats)
            if part == "MoE/experts":  # the flop counter does not see grouped GEMMs: 3 x 2 x rows x (2FH + FH)
                flops = float(sum(18 * a[0].shape[0] * m.inner * m.gate_up_proj.shape[-1] for m, a, _ in calls))
            timed[part] = (seconds, flops, moved, len(calls))
        trainer.optimizers.zero_grad()

        # the optimizer step on real gradients
        trainer.engine.forward_backward(torch.as_tensor(inputs), torch.as_tensor(labels), trainer.weights)
        opt_times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            trainer.optimizers.step()
            synchronize(device)
            opt_times.append(time.perf_counter() - t0)
        opt_s = statistics.median(opt_times)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        peak, peak_source = trainer.peak_flops, trainer.peak_source
        model_flops = records[-1]["model_flops_per_token"]

    bandwidth = measure_bandwidth(device)
    parts: list[Part] = []
    moe = timed.pop("MoE", None)
    inner = {k: timed.pop(f"MoE/{k}", None) for k in MOE_INNER}
    order = [p for p, _ in PART_MODULES if p != "MoE"]
    for name in order[:1]:
        if name in timed:
            parts.append(_part(name, *timed.pop(name)))
    if moe is not None:
        router, experts = inner["router"], inner["experts"]
        if router is not None:
            parts.append(_part("router", *router))
        if experts is not None:
            parts.append(_part("expert GEMMs (grouped)", *experts))
        rest = moe[0] - sum(x[0] for x in (router, experts) if x is not None)
        parts.append(_part("dispatch/combine + identity experts", max(rest, 0.0), 0.0, moe[2], moe[3]))
    for name in order[1:]:
        if name in timed:
            parts.append(_part(name, *timed.pop(name)))
    for name, values in timed.items():
        parts.append(_part(name, *values))
    parts.append(Part("optimizer", opt_s, 1, bytes=float(4 * param_bytes)))
    parts.append(Part("data (next batch)", data_s, cfg.grad_accum))
    covered = sum(p.seconds for p in parts)
    parts.append(Part("other (residuals, MTP projection, statistics, clipping, autograd)", max(step_s - covered, 0.0), 0))

    for p in parts:
        p.share = p.seconds / step_s if step_s > 0 else 0.0
        if p.seconds > 0:
            p.flops_per_s = p.flops / p.seconds if p.flops else None
            p.bytes_per_s = p.bytes / p.seconds if p.bytes else None
        # FLOP-bound if its arithmetic intensity beats the machine's balance point
        if p.flops_per_s and p.bytes and p.flops / p.bytes > peak / bandwidth:
            p.peak_fraction = p.flops_per_s / peak
        elif p.bytes_per_s:
            p.peak_fraction = p.bytes_per_s / bandwidth
    tokens_per_s = tokens / step_s
    return StepProfile(
        tokens_per_step=tokens, step_s=step_s, tokens_per_s=tokens_per_s, model_flops_per_token=model_flops,
        mfu=tokens_per_s * model_flops / peak, peak_flops=peak, peak_flops_source=peak_source,
        bandwidth_bytes_per_s=bandwidth, precision=str(trainer.autocast_dtype or "fp32").replace("torch.", ""),
        threads=torch.get_num_threads(), parts=parts,
    )


def _part(name: str, seconds: float, flops: float, moved: float, calls: int) -> Part:
    return Part(name, seconds, calls, flops=flops or None, bytes=moved or None)


def format_profile(p: StepProfile) -> str:
    lines = [
        f"train step: {p.tokens_per_step} tokens in {p.step_s * 1e3:.0f} ms = {p.tokens_per_s:,.0f} tokens/s, "
        f"MFU {p.mfu:.1%} ({p.precision}, {p.threads} thread(s))",
        f"peaks: {p.peak_flops / 1e9:.0f} GFLOP/s ({p.peak_flops_source}); "
        f"{p.bandwidth_bytes_per_s / 1e9:.1f} GB/s (fp32 multiply on 256 MiB)",
        "",
        f"{'part':<62} {'ms':>8} {'share':>6} {'GFLOP/s':>8} {'GB/s':>7} {'of peak':>8}",
    ]
    for part in p.parts:
        gf = f"{part.flops_per_s / 1e9:8.1f}" if part.flops_per_s else f"{'-':>8}"
        gb = f"{part.bytes_per_s / 1e9:7.2f}" if part.bytes_per_s else f"{'-':>7}"
        frac = f"{part.peak_fraction:8.1%}" if part.peak_fraction is not None else f"{'-':>8}"
        lines.append(f"{part.name:<62} {part.seconds * 1e3:8.1f} {part.share:6.1%} {gf} {gb} {frac}")
    lines.append("")
    lines.append("'of peak': GEMM peak for parts whose FLOPs per byte exceed the machine's balance point, memory "
                 "bandwidth for the rest; bytes are a lower bound (each input, output and gradient touched once)")
    return "\n".join(lines)


__all__ = ["Part", "StepProfile", "format_profile", "measure_bandwidth", "profile_train_step"]
