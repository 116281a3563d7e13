"""The out-of-memory frontier: for each sequence length, the largest batch that runs under a memory cap.

Every trial is a fresh child process (`python -m longcat.bench.oom TRIAL_JSON`) so that nothing
one trial allocated is still held by the next. The child caps its own memory before it builds the
model:
- CPU: RLIMIT_AS = the virtual size it already has (Python, torch and their libraries, most of it
  reserved address space that is never resident) + the budget. What the workload maps from then on
  (weights, optimizer state, activations, cache) counts against the budget, so the cap is the
  workload's memory, not the runtime's.
- CUDA: `torch.cuda.set_per_process_memory_fraction(budget / device memory)`.
- Ascend NPU: `torch.npu.set_per_process_memory_fraction` the same way.
and a wall-clock timeout. Each trial ends `ok`, `oom` (the allocator refused, or the kernel killed
the process), `error` (anything else, with its message) or `timeout`.

The search per sequence length doubles the batch from 1 until a trial fails, then bisects between
the last success and the first failure (`largest_passing`). The same search over the planner's
memory prediction gives the predicted frontier for the same memory.

Routing skew: `uniform` leaves the router as built (near-uniform over experts at initialisation);
`concentrated` adds +1 to `e_score_correction_bias` of the first top-k FFN experts of every layer, so
every token picks the same k FFN experts (and no identity expert): the most imbalanced routing the
MoE can see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

GiB = 2**30
STATUSES = ("ok", "oom", "error", "timeout")
MODES = ("train", "decode")
SKEWS = ("uniform", "concentrated")
# what allocators say when refused: torch's CPU and CUDA allocators, Python, C++, and oneDNN (which
# reports a failed scratchpad allocation as "could not create a primitive")
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "memoryerror", "bad_alloc",
               "failed to allocate", "could not create a primitive")


@dataclass
class Trial:
    """One child-process run: the workload, the cap and how it ended."""

    model: str
    mode: str
    seq_len: int
    batch: int
    memory_gib: float
    skew: str = "uniform"
    device: str = "cpu"
    threads: int = 1
    timeout_s: float = 120.0
    decode_tokens: int = 4
    status: str = ""
    seconds: float = 0.0
    peak_rss_gib: float | None = None
    peak_device_gib: float | None = None  # the device allocator's peak (null on the CPU)
    baseline_vms_gib: float | None = None
    message: str = ""


def largest_passing(run: Callable[[int], str], *, limit: int = 4096) -> tuple[int, list[tuple[int, str]]]:
    """The largest n in [1, limit] with run(n) == "ok", assuming success is monotone (n ok ->
    every smaller n ok): doubling from 1 until the first failure, then bisection. Returns it (0
    when even 1 fails) and the (n, status) of every call, in order."""
    calls: list[tuple[int, str]] = []

    def ok(n: int) -> bool:
        status = run(n)
        calls.append((n, status))
        return status == "ok"

    good, bad, n = 0, None, 1
    while n <= limit:
        if not ok(n):
            bad = n
            break
        good, n = n, n * 2
    if bad is None:
        if good < limit:  # doubling stepped over the limit: bisect up to it
            bad = limit + 1
        else:
            return good, calls
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, calls


def classify(returncode: int, stderr: str) -> str:
    """A finished child's status from its exit code and error output."""
    if returncode == 0:
        return "ok"
    text = stderr.lower()
    if any(marker in text for marker in OOM_MARKERS):
        return "oom"
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):  # the kernel's OOM killer
        return "oom"
    return "error"


def run_trial(trial: Trial) -> Trial:
    """`trial` in a fresh child process; returns it with status, seconds and measurements filled."""
    env = {**os.environ, "OMP_NUM_THREADS": str(trial.threads), "MALLOC_ARENA_MAX": "2"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "longcat.bench.oom", json.dumps(asdict(trial))],
                              capture_output=True, text=True, timeout=trial.timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        trial.status, trial.seconds = "timeout", time.perf_counter() - start
        trial.message = f"no answer within {trial.timeout_s:g} s"
        return trial
    trial.seconds = time.perf_counter() - start
    trial.status = classify(proc.returncode, proc.stderr)
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        trial.peak_rss_gib, trial.baseline_vms_gib = data.get("peak_rss_gib"), data.get("baseline_vms_gib")
        trial.peak_device_gib = data.get("peak_device_gib")
        break
    if trial.status != "ok":
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        trial.message = (lines[-1] if lines else f"exit code {proc.returncode}")[:300]
    return trial


# --- the child ----------------------------------------------------------------------------------------


def _cap_memory(trial: Trial) -> float:
    """Cap this process at its current size + the budget; its virtual size before, in GiB."""
    import resource

    import psutil
    import torch

    baseline = psutil.Process().memory_info().vms
    if trial.device == "cpu":
        limit = int(baseline + trial.memory_gib * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    else:
        device = torch.device(trial.device)
        backend = getattr(torch, device.type)
        total = backend.get_device_properties(device).total_memory
        backend.set_per_process_memory_fraction(min(1.0, trial.memory_gib * GiB / total), device)
    return baseline / GiB


def skew_routing(model, skew: str) -> None:
    """`concentrated`: every token picks the same top-k FFN experts (see the module docstring)."""
    import torch

    if skew == "uniform":
        return
    if skew != "concentrated":
        raise ValueError(f"unknown routing skew {skew!r}; choose from {', '.join(SKEWS)}")
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None and hasattr(module, "top_k"):
                bias[: module.top_k] += 1.0  # softmax probabilities are < 1: these always win


def _child(trial: Trial) -> None:
    import torch

    torch.set_num_threads(trial.threads)
    from ..plan.calibrate import peak_rss_bytes
    from .subject import resolve_subject

    subject = resolve_subject(trial.model)
    baseline = _cap_memory(trial)
    device = torch.device(trial.device)
    model = subject.build(device).float()
    skew_routing(model, trial.skew)
    gen = torch.Generator().manual_seed(0)
    vocab = subject.config.vocab_size
    if trial.mode == "train":
        from ..model import lm_losses

        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        for _ in range(2):  # the second step holds the optimizer state and the activations at once
            tokens = torch.randint(3, vocab, (trial.batch, trial.seq_len + 1), generator=gen).to(device)
            labels = tokens[:, 1:]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                # as the Trainer runs it: the fused loss, no (tokens, vocab) logits held
                out = model(tokens[:, :-1], labels=labels)
            losses = lm_losses(out, labels)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del out, losses
    else:
        from ..infer import Engine, SamplingParams

        model.eval()
        prompts = torch.randint(3, vocab, (trial.batch, trial.seq_len), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=trial.decode_tokens, temperature=0, ignore_eos=True)
        Engine(model).generate(prompts, params)
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    device_peak = getattr(backend, "max_memory_allocated", None)
    print(json.dumps({"peak_rss_gib": peak_rss_bytes() / GiB, "baseline_vms_gib": baseline,
                      "peak_device_gib": device_peak(device) / GiB if callable(device_peak) else None}))


# --- the predicted frontier -----------------------------------------------------------------------------


def predicted_fits(subject, mode: str, memory_gib: float, reserved_gib: float, hardware: str = "cpu-local"):
    """A predicate batch -> bool from the planner's memory for (seq_len, batch) on a device with
    `memory_gib` for the workload (+ `reserved_gib` for the runtime, which the planner counts)."""
    from ..plan.arch import from_longcat

    arch = from_longcat(subject.config, name=subject.name)
    if mode == "train":
        from ..plan.hardware import load_hardware, load_stack
        from ..plan.layout import Layout
        from ..plan.train import Planner, TrainSetup

        hw = load_hardware(hardware, {"hbm_gib": memory_gib + reserved_gib, "reserved_gib": reserved_gib})
        stack = load_stack("pytorch-eager")

        def fits(seq_len: int, batch: int) -> bool:
            setup = TrainSetup(arch, hw, stack, chips=1, seq_len=seq_len, global_batch_tokens=seq_len * batch,
                               optimizer="adamw", precision="autocast")
            layout = Layout(tp=1, pp=1, ep=1, cp=1, dp=1, zero=0, recompute="none", microbatch=batch, schedule="1f1b")
            planner = Planner(setup)
            if planner.check(layout):
                return False
            plan = planner.evaluate(layout)
            return plan is not None and plan.fits

        return fits, "planner memory (plan train: AdamW, bf16 autocast, fp32 master, stack pytorch-eager)"
    from ..model import LatentCache, count_parameters

    weights = count_parameters(subject.config).total * 4
    per_token = LatentCache.bytes_per_token(subject.config, dtype_bytes=4)

    def fits_decode(seq_len: int, batch: int) -> bool:
        return weights + batch * (seq_len + 8) * per_token <= memory_gib * GiB

    return fits_decode, "fp32 weights + latent cache (the serving planner's memory terms; no activations)"


def run_frontier(model: str, *, mode: str = "train", seq_lens=(64, 256), memory_gib: float = 1.0,
                 skews=("uniform",), device: str = "cpu", threads: int = 1, timeout_s: float = 120.0,
                 max_batch: int = 256, log=print) -> dict:
    """The measured frontier per (skew, sequence length), every trial, and the planner's frontier."""
    from ..config import ConfigError
    from .subject import resolve_subject

    subject = resolve_subject(model)
    trials: list[dict] = []
    measured: list[dict] = []
    reserved = None
    for skew in skews:
        for seq_len in seq_lens:
            def run(batch: int, seq_len=seq_len, skew=skew) -> str:
                nonlocal reserved
                t = run_trial(Trial(model, mode, seq_len, batch, memory_gib, skew, device, threads, timeout_s))
                trials.append(asdict(t))
                log(f"  {mode} {skew:12s} seq {seq_len:6d} batch {batch:5d}: {t.status} ({t.seconds:.1f} s)"
                    + (f" {t.message}" if t.status in ("error", "timeout") else ""))
                return t.status

            best, calls = largest_passing(run, limit=max_batch)
            statuses = {s for _, s in calls}
            measured.append({"skew": skew, "seq_len": seq_len, "max_batch": best, "trials": len(calls),
                             "limited_by": "max_batch" if best == max_batch else
                             ("oom" if "oom" in statuses else sorted(statuses - {"ok"})[0] if statuses - {"ok"}
                              else None)})
    ok = [t for t in trials if t["status"] == "ok" and t["peak_rss_gib"] is not None]
    from ..plan.calibrate import current_rss_bytes

    reserved = current_rss_bytes() / GiB  # a process with torch loaded: the runtime the planner reserves
    predicted, predicted_reason = [], None
    try:  # minutes of trials are not lost to a planner that cannot answer
        fits, basis = predicted_fits(subject, mode, memory_gib, reserved)
        for seq_len in seq_lens:
            best, _ = largest_passing(lambda b, s=seq_len: "ok" if fits(s, b) else "oom", limit=max_batch)
            predicted.append({"seq_len": seq_len, "max_batch": best})
    except (ConfigError, ValueError) as exc:
        predicted, basis, predicted_reason = None, None, f"the planner could not answer: {exc}"
    return {
        "predicted_reason": predicted_reason,
        "mode": mode, "model": subject.name, "config_hash": subject.config_hash, "memory_budget_gib": memory_gib,
        "device": device, "threads": threads, "timeout_s": timeout_s, "max_batch": max_batch,
        "cap": ("RLIMIT_AS = the child's virtual size after importing torch + the budget" if device == "cpu"
                else "set_per_process_memory_fraction(budget / device memory)"),
        "skews": list(skews), "measured": measured, "predicted": predicted, "predicted_basis": basis,
        "trials": trials, "trials_ok_peak_rss_gib_max": max((t["peak_rss_gib"] for t in ok), default=None),
        "workload": ("2 training steps (AdamW, bf16 autocast, fp32 weights), random tokens, seed 0" if mode == "train"
                     else "prefill + 4 greedy decode tokens (Engine.generate, fp32), random prompts, seed 0"),
    }


def plot_frontier(result: dict, path) -> str | None:
    """frontier.png: measured max batch per sequence length (one line per skew) and the prediction;
    None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    none_runs = False

    def line(rows, style, label, **kw):
        """Batches on a log axis; a length where not even batch 1 runs is an x on the bottom edge."""
        nonlocal none_runs
        runs = [r for r in rows if r["max_batch"] > 0]
        drawn = ax.plot([r["seq_len"] for r in runs], [r["max_batch"] for r in runs], style, label=label, **kw)
        zero = [r["seq_len"] for r in rows if r["max_batch"] == 0]
        if zero:
            none_runs = True
            ax.plot(zero, [0.5] * len(zero), "x", color=drawn[0].get_color(), markersize=10, mew=2)

    for skew in result["skews"]:
        line([r for r in result["measured"] if r["skew"] == skew], "o-", f"measured ({skew} routing)")
    if result["predicted"]:
        line(result["predicted"], "s--", "predicted: " + result["predicted_basis"].split(" (")[0], color="gray")
    if none_runs:
        ax.plot([], [], "x", color="black", label="not even batch 1 runs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("largest batch that runs")
    ax.set_title(f"{result['mode']} OOM frontier, {result['model']}, {result['memory_budget_gib']:g} GiB budget",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":  # a trial's child process
    _trial = Trial(**json.loads(sys.argv[1]))
    try:
        _child(_trial)
    except MemoryError:
        print("MemoryError: out of memory", file=sys.stderr)
        sys.exit(3)
