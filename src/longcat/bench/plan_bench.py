"""Planner vs reality on this machine: a training configuration, predicted and measured.

The default configuration is what `make demo` trains: preset `small`, sequence length 256,
micro-batch 16 sequences, no gradient accumulation, bf16 autocast on the CPU, fp32 master
weights, one process. The optimizer is AdamW (single-tensor form), the one the planner models
byte for byte.

1. Measure the machine as `longcat plan calibrate --model PRESET` does, on this configuration's
   own shapes, into a hardware entry (the user's cpu-local entry, which overrides the packaged
   one, unless `output` says otherwise), or take an existing entry (`hardware`).
2. Ask the planner for the same configuration (stack `pytorch-eager`, precision `autocast`).
3. In a fresh child process (so that its peak RSS is the training's own), run warmup + steps real
   training steps and record the mean step time and the peak resident memory (the plan's total,
   allocator retention included); then once more for a few steps with glibc mapping every buffer
   on its own, whose peak RSS is the peak of live memory (the plan without its `allocator` share).

This is the check that feeds the planner: the calibrated entry is what `longcat plan train
--hardware cpu-local` uses, and the error printed here is how far to trust it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError


@dataclass
class PlanSetup:
    """The training configuration both sides see."""

    preset: str = "small"
    seq_len: int = 256
    micro_batch: int = 16
    threads: int = 1
    clock: str = "cpu"  # "cpu": this process's CPU seconds (one thread); "wall": elapsed seconds
    device: str = "cpu"  # where train_steps runs (bf16 autocast on that device)


def setup_config(setup: PlanSetup):
    """The model config of `setup.preset`: a preset name, or a model directory (its config.json)."""
    from ..config import PRESETS, load_config, preset

    return preset(setup.preset) if setup.preset in PRESETS or not Path(setup.preset).is_dir() \
        else load_config(setup.preset)


def train_steps(setup: PlanSetup, steps: int, warmup: int) -> dict:
    """Train for warmup + steps steps in this process; the measurements as a dict."""
    import torch

    from ..model import build_model, lm_losses
    from ..plan.calibrate import current_rss_bytes, peak_rss_bytes
    from .common import Timer

    torch.set_num_threads(setup.threads)
    # the Trainer's default (train.deterministic): deterministic kernels, new tensors not NaN-filled
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    device = torch.device(setup.device)
    timer, wall = Timer(setup.clock, device), Timer("wall", device)
    baseline = current_rss_bytes()
    config = setup_config(setup)
    model = build_model(config).to(device).train()  # fp32 weights: the master copy
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )
    gen = torch.Generator().manual_seed(0)
    times, walls = [], []
    first_peak = 0
    for step in range(warmup + steps):
        tokens = torch.randint(0, config.vocab_size, (setup.micro_batch, setup.seq_len + 1), generator=gen).to(device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        start, wall_start = timer(), wall()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            # as the Trainer runs it: given the labels, the forward computes the losses block by
            # block (fused linear cross-entropy) and never holds the (tokens, vocab) logits
            out = model(inputs, labels=labels)
        losses = lm_losses(out, labels)
        loss = losses["lm"] + 0.3 * sum(v for k, v in losses.items() if k != "lm")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out, losses, loss
        elapsed = timer() - start
        if step >= warmup:
            times.append(elapsed)
            walls.append(wall() - wall_start)
        if step == 1:  # two steps: the optimizer state exists, the allocator has not yet fragmented
            first_peak = peak_rss_bytes()
    mean = sum(times) / len(times)
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    device_peak = getattr(backend, "max_memory_allocated", None)
    return {
        "peak_device_memory_gib": device_peak(device) / 2**30 if callable(device_peak) else None,
        "step_times_s": times,
        "step_time_s": mean, "step_time_std_s": (sum((t - mean) ** 2 for t in times) / len(times)) ** 0.5,
        "step_time_min_s": min(times), "steps": len(times), "wall_step_time_s": sum(walls) / len(walls),
        "clock": "process CPU time" if setup.clock == "cpu" else "wall clock",
        "peak_rss_gib": peak_rss_bytes() / 2**30, "peak_rss_two_steps_gib": (first_peak or peak_rss_bytes()) / 2**30,
        "baseline_rss_gib": baseline / 2**30, "threads": torch.get_num_threads(),
    }


def _train_in_child(setup: PlanSetup, steps: int, warmup: int, env: dict | None = None) -> dict:
    """`train_steps` in a fresh interpreter: this process has already grown by the calibration."""
    spec = json.dumps({"setup": asdict(setup), "steps": steps, "warmup": warmup})
    proc = subprocess.run([sys.executable, "-m", "longcat.bench.plan_bench", spec], capture_output=True, text=True,
                          check=False, env=env)
    if proc.returncode:
        raise RuntimeError(f"the training child process failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def calibrate(setup: PlanSetup, output: Path, quick: bool, log) -> str:
    """Measure this machine on the configuration's shapes into `output`; its path, for load_hardware."""
    from ..plan.arch import from_longcat
    from ..plan.calibrate import measure, to_toml

    cpu_time = setup.clock == "cpu"
    tokens = setup.seq_len * setup.micro_batch
    log(f"calibrating (longcat plan calibrate --model {setup.preset} --tokens {tokens} --seq-len {setup.seq_len} "
        f"--threads {setup.threads}{' --cpu-time' if cpu_time else ''}{' --quick' if quick else ''} "
        f"--output {output}) ...")
    measured = measure(quick=quick, threads=setup.threads, arch=from_longcat(setup_config(setup), name=Path(setup.preset).name),
                       tokens=tokens, seq_len=setup.seq_len, cpu_time=cpu_time)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(to_toml(measured))
    return str(output)


def predict(setup: PlanSetup, hardware: str):
    """The planner's plan for the configuration, one chip, no parallelism; and the hardware entry."""
    from ..plan.arch import from_longcat
    from ..plan.hardware import load_hardware, load_stack
    from ..plan.layout import Layout
    from ..plan.train import Planner, TrainSetup

    arch = from_longcat(setup_config(setup), name=Path(setup.preset).name)
    hw = load_hardware(hardware)
    plan_setup = TrainSetup(arch, hw, load_stack("pytorch-eager"), chips=1, seq_len=setup.seq_len,
                            global_batch_tokens=setup.seq_len * setup.micro_batch, optimizer="adamw",
                            precision="autocast")
    layout = Layout(tp=1, pp=1, ep=1, cp=1, dp=1, zero=0, recompute="none", microbatch=setup.micro_batch,
                    schedule="1f1b")
    planner = Planner(plan_setup)
    reasons = planner.check(layout)
    if reasons:
        raise UserError(f"--preset {setup.preset} --micro-batch {setup.micro_batch}: the planner rejects this "
                        f"configuration on {hw.name} ({'; '.join(reasons)}); choose a smaller preset or micro-batch")
    plan = planner.evaluate(layout)
    if plan is None:
        raise UserError(f"--preset {setup.preset} --micro-batch {setup.micro_batch}: the planner finds no plan for "
                        f"this configuration on {hw.name}; choose a smaller preset or micro-batch")
    return plan, hw


def kv_cache_check(setup: PlanSetup) -> dict:
    """The planner's KV bytes per token for this repository's engine (`plan serve --engine longcat`)
    against what a real `LatentCache` of the configuration allocates (bf16, with the MTP rows, as
    `longcat.infer.Engine` builds it)."""
    import torch

    from ..model.cache import LatentCache
    from ..plan.arch import from_longcat
    from ..plan.engines import kv_layout, load_engine

    config = setup_config(setup)
    mtp = config.mtp_num_layers > 0
    cache = LatentCache(config, 1, setup.seq_len, dtype=torch.bfloat16, with_mtp=mtp)
    measured = cache.nbytes() / setup.seq_len
    predicted = kv_layout(from_longcat(config), load_engine("longcat"), "bf16", mtp=mtp)["total"]
    return {"predicted_bytes_per_token": predicted, "measured_bytes_per_token": measured,
            "error": predicted / measured - 1}


def run_plan_bench(setup: PlanSetup, *, steps: int = 10, warmup: int = 2, hardware: str | None = None,
                   output: str | None = None, quick: bool = False, log=print) -> dict:
    load_start = os.getloadavg()[0]
    if hardware is None:
        from ..plan.calibrate import default_output

        hardware = calibrate(setup, Path(output) if output else default_output(), quick, log)
    plan, hw = predict(setup, hardware)  # before the minutes of training: a bad entry fails now
    log(f"training {warmup}+{steps} steps in a child process ...")
    real = _train_in_child(setup, steps, warmup)
    # Live memory: glibc keeps freed heap blocks (everything under its mmap threshold, which grows to
    # 32 MiB) and the RSS grows with fragmentation from step to step. With a 64 KiB threshold every
    # tensor buffer is mapped and unmapped on its own, so the peak RSS is the peak of live memory.
    from ..plan.calibrate import LIVE_MMAP_THRESHOLD

    log(f"measuring live memory (MALLOC_MMAP_THRESHOLD_={LIVE_MMAP_THRESHOLD}, 3 steps) ...")
    live = _train_in_child(setup, 1, 2, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(LIVE_MMAP_THRESHOLD)})
    real["peak_live_gib"] = live["peak_rss_gib"]
    real["load_average_start"], real["load_average_end"] = load_start, os.getloadavg()[0]
    predicted_time, predicted_mem = plan.step_time_s, plan.memory_gib["total"]
    # the live peak has no allocator retention: compare it with the plan without that category
    predicted_live = predicted_mem - plan.memory_gib.get("allocator", 0.0)
    return {
        "config": {**asdict(setup), "precision": "bf16 autocast, fp32 master", "optimizer": "AdamW (single-tensor)",
                   "processes": 1},
        "hardware": hw.to_dict(),
        "measured": real,
        "predicted": {"step_time_s": predicted_time, "peak_memory_gib": predicted_mem, "peak_live_memory_gib": predicted_live,
                      "step_breakdown_s": plan.step, "memory_gib": plan.memory_gib},
        "error": {"step_time": predicted_time / real["step_time_s"] - 1,
                  "peak_memory": predicted_mem / real["peak_rss_gib"] - 1,
                  "peak_live_memory": predicted_live / real["peak_live_gib"] - 1},
        "kv_cache": kv_cache_check(setup),
    }


def format_report(result: dict) -> str:
    hw, real, pred, err = result["hardware"], result["measured"], result["predicted"], result["error"]
    t, m = pred["step_time_s"], pred["peak_memory_gib"]
    live = pred.get("peak_live_memory_gib", m)
    lines = [
        f"machine: {hw['description']}",
        f"  bf16 peak {hw['peak_tflops_bf16'] * 1e3:.0f} GFLOP/s, GEMM eff {hw['gemm_efficiency']:.2f}, expert GEMM eff "
        f"{hw['expert_gemm_efficiency']:.2f}, attention eff {hw['attention_efficiency']:.2f}, memory "
        f"{hw['hbm_bandwidth_gbs']:.1f} GB/s, {hw['kernel_overhead_us']:.1f} us/op, runtime {hw['reserved_gib']:.2f} GiB, allocator retention "
        f"{hw.get('allocator_retention', 0.0):.0%} of the live tensors",
        f"{'':22s}{'predicted':>12s}{'measured':>12s}{'error':>9s}",
        f"{'step time (s)':22s}{t:12.4g}{real['step_time_s']:12.4g}{err['step_time']:+9.1%}"
        f"   ({real['clock']}, +- {real['step_time_std_s']:.3f} s over {real['steps']} steps, {real['threads']} "
        f"thread(s); wall clock {real['wall_step_time_s']:.3f} s)",
        f"{'peak memory (GiB)':22s}{m:12.4g}{real['peak_rss_gib']:12.4g}{err['peak_memory']:+9.1%}"
        f"   (peak RSS over the run; {real['peak_rss_two_steps_gib']:.2f} GiB after two steps; torch runtime alone "
        f"{real['baseline_rss_gib']:.2f} GiB)",
        f"{'peak live memory (GiB)':22s}{live:12.4g}{real['peak_live_gib']:12.4g}{err['peak_live_memory']:+9.1%}"
        f"   (peak RSS with every buffer mmapped: no allocator retention; predicted without it)",
    ]
    kv = result.get("kv_cache")
    if kv:
        lines.append(f"{'KV bytes per token':22s}{kv['predicted_bytes_per_token']:12,.0f}{kv['measured_bytes_per_token']:12,.0f}"
                     f"{kv['error']:+9.1%}   (plan serve --engine longcat vs a real LatentCache, bf16, MTP rows included)")
    lines += [
        f"load average {real['load_average_start']:.1f} at the start, {real['load_average_end']:.1f} at the end "
        f"({os.cpu_count()} cores); fastest measured step {real['step_time_min_s']:.3f} s",
        "predicted step time by category (s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in pred["step_breakdown_s"].items() if v),
        "predicted memory by category (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in pred["memory_gib"].items() if v),
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # the child process of _train_in_child
    _spec = json.loads(sys.argv[1])
    print(json.dumps(train_steps(PlanSetup(**_spec["setup"]), _spec["steps"], _spec["warmup"])))
