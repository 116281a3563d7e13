"""Planner vs reality on this machine: the demo's training configuration, predicted and measured.

Configuration (what `make demo` trains): preset `small`, sequence length 256, micro-batch 16
sequences, no gradient accumulation, bf16 autocast on the CPU, AdamW (single-tensor form, as the
trainer builds it), fp32 master weights, one process.

1. Measure the machine (`longcat plan calibrate --model small --tokens 4096 --seq-len 256`),
   written to configs/hardware/cpu-local.toml unless --hardware names an existing entry.
2. In a fresh child process (so its peak RSS is the training's own), run --warmup + --steps real
   training steps and record the mean step time and the peak resident memory.
3. Ask the planner for the same configuration (`--stack pytorch-eager --precision autocast`) and
   print predicted vs measured with the error.

Run once, on an otherwise idle machine if you can: other processes on the same cores slow the
training and the calibration alike but not necessarily equally.

    .venv/bin/python benchmarks/plan_vs_measured.py [--steps 10] [--threads 1 --clock cpu] [--json]

By default both sides use one thread and count the process's own CPU seconds, which other jobs on
a shared machine do not inflate; `--threads 2 --clock wall` measures the demo's default threading
by the wall clock (only meaningful on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESET, SEQ_LEN, MICRO_BATCH = "small", 256, 16


def child(steps: int, warmup: int, threads: int, cpu_time: bool) -> None:
    """Train for warmup + steps steps; print one JSON line with the measurements."""
    from longcat.plan.calibrate import current_rss_bytes, peak_rss_bytes

    import torch

    if threads:
        torch.set_num_threads(threads)
    clock = time.process_time if cpu_time else time.perf_counter

    from longcat.config import preset
    from longcat.model import build_model, lm_losses

    baseline = current_rss_bytes()
    config = preset(PRESET)
    model = build_model(config)  # fp32 weights: the master copy
    model.train()
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
        tokens = torch.randint(0, config.vocab_size, (MICRO_BATCH, SEQ_LEN + 1), generator=gen)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        start, wall = clock(), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inputs)
        losses = lm_losses(out, labels)
        loss = losses["lm"] + 0.3 * sum(v for k, v in losses.items() if k != "lm")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out, losses, loss
        elapsed = clock() - start
        if step >= warmup:
            times.append(elapsed)
            walls.append(time.perf_counter() - wall)
        if step == 1:  # two steps: the optimizer state exists, the allocator has not yet fragmented
            first_peak = peak_rss_bytes()
    mean = sum(times) / len(times)
    spread = (sum((t - mean) ** 2 for t in times) / len(times)) ** 0.5
    print(json.dumps({
        "step_time_s": mean, "step_time_std_s": spread, "step_time_min_s": min(times), "steps": len(times),
        "wall_step_time_s": sum(walls) / len(walls), "clock": "process CPU time" if cpu_time else "wall clock",
        "peak_rss_gib": peak_rss_bytes() / 2**30, "peak_rss_two_steps_gib": first_peak / 2**30,
        "baseline_rss_gib": baseline / 2**30,
        "threads": torch.get_num_threads(),
    }))


def predict(hardware: str) -> tuple[object, object]:
    from longcat.config import preset
    from longcat.plan.arch import from_longcat
    from longcat.plan.hardware import load_hardware, load_stack
    from longcat.plan.layout import Layout
    from longcat.plan.train import Planner, TrainSetup

    arch = from_longcat(preset(PRESET), name=PRESET)
    hw = load_hardware(hardware)
    setup = TrainSetup(arch, hw, load_stack("pytorch-eager"), chips=1, seq_len=SEQ_LEN,
                       global_batch_tokens=SEQ_LEN * MICRO_BATCH, optimizer="adamw", precision="autocast")
    layout = Layout(tp=1, pp=1, ep=1, cp=1, dp=1, zero=0, recompute="none", microbatch=MICRO_BATCH, schedule="1f1b")
    return Planner(setup).evaluate(layout), hw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hardware", default=None, help="use this hardware entry instead of calibrating now")
    parser.add_argument("--output", default=None, help="where calibration writes (default configs/hardware/cpu-local.toml)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for calibration and training (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the process's CPU seconds (needs --threads 1; robust on a shared machine); wall: wall-clock")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu_time = args.clock == "cpu"
    if cpu_time and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (CPU seconds add up across threads); use --clock wall")
    if args.child:
        child(args.steps, args.warmup, args.threads, cpu_time)
        return 0

    load_start = os.getloadavg()[0]
    hardware = args.hardware
    measured_hw = None
    if hardware is None:
        from pathlib import Path

        from longcat.plan.arch import from_longcat
        from longcat.plan.calibrate import default_output, measure, to_toml
        from longcat.config import preset

        print(f"calibrating (longcat plan calibrate --model small --tokens 4096 --seq-len 256 --threads {args.threads}"
              f"{' --cpu-time' if cpu_time else ''}) ...", file=sys.stderr)
        measured_hw = measure(arch=from_longcat(preset(PRESET), name=PRESET), tokens=SEQ_LEN * MICRO_BATCH, seq_len=SEQ_LEN,
                              threads=args.threads, cpu_time=cpu_time)
        path = Path(args.output) if args.output else default_output()
        path.write_text(to_toml(measured_hw))
        hardware = str(path)
    print(f"training {args.warmup}+{args.steps} steps in a child process ...", file=sys.stderr)
    command = [sys.executable, __file__, "--child", "--warmup", str(args.warmup), "--threads", str(args.threads), "--clock", args.clock]
    proc = subprocess.run(command + ["--steps", str(args.steps)], capture_output=True, text=True, check=False)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    # Live memory: glibc keeps freed heap blocks (everything under its mmap threshold, which grows to
    # 32 MiB) and the RSS grows with fragmentation from step to step. With a 64 KiB threshold every
    # tensor buffer is mapped and unmapped on its own, so the peak RSS is the peak of live memory.
    print("measuring live memory (MALLOC_MMAP_THRESHOLD_=65536, 3 steps) ...", file=sys.stderr)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    live = subprocess.run(command + ["--steps", "1"], capture_output=True, text=True, check=False, env=env)
    if live.returncode:
        print(live.stderr, file=sys.stderr)
        return live.returncode
    real["peak_live_gib"] = json.loads(live.stdout.strip().splitlines()[-1])["peak_rss_gib"]
    real["load_average_start"], real["load_average_end"] = load_start, os.getloadavg()[0]
    plan, hw = predict(hardware)
    predicted_time, predicted_mem = plan.step_time_s, plan.memory_gib["total"]
    result = {
        "config": {"preset": PRESET, "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH, "precision": "bf16 autocast, fp32 master",
                   "optimizer": "AdamW (single-tensor)", "processes": 1},
        "hardware": hw.to_dict(),
        "measured": real,
        "predicted": {"step_time_s": predicted_time, "peak_memory_gib": predicted_mem,
                      "step_breakdown_s": plan.step, "memory_gib": plan.memory_gib},
        "error": {"step_time": predicted_time / real["step_time_s"] - 1, "peak_memory": predicted_mem / real["peak_rss_gib"] - 1,
                  "peak_live_memory": predicted_mem / real["peak_live_gib"] - 1},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"machine: {hw.description}")
    print(f"  bf16 peak {hw.peak_tflops_bf16 * 1e3:.0f} GFLOP/s, GEMM eff {hw.gemm_efficiency:.2f}, expert GEMM eff "
          f"{hw.expert_gemm_efficiency:.2f}, attention eff {hw.attention_efficiency:.2f}, memory {hw.hbm_bandwidth_gbs:.1f} GB/s, "
          f"{hw.kernel_overhead_us:.1f} us/op, runtime {hw.reserved_gib:.2f} GiB")
    print(f"{'':22s}{'predicted':>12s}{'measured':>12s}{'error':>9s}")
    print(f"{'step time (s)':22s}{predicted_time:12.3f}{real['step_time_s']:12.3f}{result['error']['step_time']:+9.1%}"
          f"   ({real['clock']}, +- {real['step_time_std_s']:.3f} s over {real['steps']} steps, {real['threads']} thread(s); "
          f"wall clock {real['wall_step_time_s']:.3f} s)")
    print(f"{'peak memory (GiB)':22s}{predicted_mem:12.3f}{real['peak_rss_gib']:12.3f}{result['error']['peak_memory']:+9.1%}"
          f"   (peak RSS over the run; {real['peak_rss_two_steps_gib']:.2f} GiB after two steps; torch runtime alone "
          f"{real['baseline_rss_gib']:.2f} GiB)")
    print(f"{'peak live memory (GiB)':22s}{predicted_mem:12.3f}{real['peak_live_gib']:12.3f}{result['error']['peak_live_memory']:+9.1%}"
          f"   (peak RSS with every buffer mmapped: no allocator retention)")
    print(f"load average {real['load_average_start']:.1f} at the start, {real['load_average_end']:.1f} at the end "
          f"({os.cpu_count()} cores); fastest measured step {real['step_time_min_s']:.3f} s")
    print("predicted step time by category: " + ", ".join(f"{k} {v:.3f}" for k, v in plan.step.items() if v))
    print("predicted memory by category (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in plan.memory_gib.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
