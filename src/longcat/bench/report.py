"""`longcat bench run`: one command, one shareable report (docs/VALIDATION.md).

Writes OUT/report.json (schema `longcat.bench.report/1`), OUT/report.md, PNG plots and
OUT/telemetry.jsonl (every telemetry sample). Each section reuses the benchmark that owns the
measurement: `train` is `plan_bench.train_steps` in a child process next to `plan_bench.predict`
(the planner on the same configuration), `decode` runs the inference `Engine` and, for a trained
model with MTP heads, `infer_bench.run_speculative_bench`; `oom_frontier` is bench/oom.py and
`numerics` bench/numerics.py. With `nproc` > 1, `train` is `longcat train --nproc N --parallel
LAYOUT` (the Trainer) read back from its metrics.jsonl, and every rank runs `decode_section` on its
shard (`longcat.parallel.inference`, what `longcat generate --nproc` uses) under torchrun. `serve`
is `serve_load.load_test` (the `longcat bench serve` generator) against our server or another's.
A value that could not be measured is null, with a `*_reason` (or `reason`) next to it, never 0.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SCHEMA = "longcat.bench.report/1"
GiB = 2**30


@dataclass
class Suite:
    """What a suite measures; `quick` fits in a few minutes on two CPU cores, `full` in twenty."""

    name: str
    train_seq_len: int
    train_micro_batch: int
    train_warmup: int
    train_steps: int
    decode_batches: tuple[int, ...]
    decode_prompts: tuple[int, ...]
    decode_outputs: tuple[int, ...]
    decode_repeats: int
    decode_modes: tuple[str, ...]
    oom_seq_lens: tuple[int, ...]
    oom_skews: tuple[str, ...]
    oom_memory_gib: float
    oom_max_batch: int
    numerics_tokens: int
    numerics_train_steps: int
    calibrate_quick: bool
    # the serve section's seeded load (`longcat bench serve` settings): requests, prompt words,
    # output tokens, requests in flight, unmeasured warm-up requests
    serve_prompts: int = 16
    serve_input_len: int = 32
    serve_output_len: int = 16
    serve_concurrency: int = 4
    serve_warmup: int = 2


SUITES = {
    "quick": Suite("quick", 128, 4, 1, 3, (1, 4), (32, 128), (16,), 3, ("eager",), (128,), ("uniform",), 1.5, 16,
                   256, 6, True),
    "full": Suite("full", 256, 16, 2, 10, (1, 8), (128, 1024), (64,), 3, ("eager", "compiled"), (64, 256),
                  ("uniform", "concentrated"), 1.5, 32, 1024, 30, False, serve_prompts=64, serve_input_len=64,
                  serve_output_len=32, serve_concurrency=8, serve_warmup=4),
}

# text the N-rank training run tokenizes (the embedded corpus), and a BPE tokenizer is trained on
# when the model has none: enough windows for every suite, a few seconds to prepare
TRAIN_CORPUS_BYTES = 1 << 20
SERVE_TOKENIZER_BYTES = 1 << 20
SINGLE_PROCESS = "single process"


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the relative spread (max - min) / median of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "repeats": len(values),
            "relative_spread": (max(values) - min(values)) / med if med else None}


def _throughput(suite, step_times: list[float], flops_tok: float, peak_flops: float, peak_source: str) -> dict:
    """The train section's speed keys, from the measured step times (warm-up already dropped)."""
    tok_s = suite.train_seq_len * suite.train_micro_batch / statistics.median(step_times)
    model_flops = tok_s * flops_tok
    return {
        "warmup_steps_excluded": suite.train_warmup,
        "step_time_s": spread(step_times),
        "tokens_per_s": tok_s,
        "model_flops_per_token": flops_tok,
        "model_flops_per_s": model_flops,
        "hardware_flops_per_s": model_flops,
        "hardware_flops_note": "no activation recomputation in this run, so hardware FLOPs equal model FLOPs",
        "mfu": model_flops / peak_flops, "hfu": model_flops / peak_flops,
        "mfu_denominator_flops_per_s": peak_flops, "mfu_denominator_source": peak_source,
    }


def null(reason: str) -> dict[str, Any]:
    return {"value": None, "reason": reason}


# --- sections -----------------------------------------------------------------------------------------


def train_section(subject, suite: Suite, device: torch.device, clock: str, threads: int, hardware: str | None,
                  out: Path, peak: dict, log) -> tuple[dict, Any]:
    """Training throughput and memory from plan_bench.train_steps (a child process), with the
    planner's prediction for the same configuration. Returns the section and the hardware entry."""
    from ..model import count_parameters
    from ..train.metrics import flops_per_token
    from .plan_bench import PlanSetup, _train_in_child, calibrate, predict

    spec = str(subject.path) if subject.path is not None else subject.spec
    setup = PlanSetup(spec, suite.train_seq_len, suite.train_micro_batch, threads, clock, str(device))
    hw_reason = None
    if hardware is None and device.type == "cpu":
        hardware = calibrate(setup, out / "hardware-calibration.toml", suite.calibrate_quick, log)
    elif hardware is None:
        from .environment import catalog_entry_for

        hardware = catalog_entry_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if hardware is None:
            hw_reason = f"no hardware entry names this {device.type} device: pass --hardware NAME|FILE.toml"
    log(f"train: {suite.train_warmup}+{suite.train_steps} steps of {suite.train_micro_batch} x {suite.train_seq_len} "
        f"tokens in a child process ...")
    real = _train_in_child(setup, suite.train_steps, suite.train_warmup, env={**os.environ,
                                                                            "OMP_NUM_THREADS": str(threads)})
    tokens = suite.train_seq_len * suite.train_micro_batch
    step_times = real["step_times_s"]
    active = count_parameters(subject.config).active_params
    flops_tok = flops_per_token(subject.config, suite.train_seq_len, active, subject.config.mtp_num_layers > 0)
    section: dict[str, Any] = {
        "workload": {"seq_len": suite.train_seq_len, "micro_batch": suite.train_micro_batch, "tokens_per_step": tokens,
                     "data": "random token ids, seed 0", "optimizer": "AdamW (single-tensor)", "grad_accum": 1},
        "precision": "bf16 autocast, fp32 master weights",
        **_throughput(suite, step_times, flops_tok, peak["peak_flops"], peak["source"]),
        "clock": real["clock"], "threads": real["threads"],
        "peak_rss_gib": real["peak_rss_gib"],
        "peak_device_memory_gib": real["peak_device_memory_gib"],
        **({} if real["peak_device_memory_gib"] is not None else
           {"peak_device_memory_reason": "the CPU has no device allocator: peak_rss_gib is the memory"}),
        "runtime_rss_gib": real["baseline_rss_gib"],
        "step_times_s": step_times,
        "layout": SINGLE_PROCESS, "processes": 1,
    }
    hw = None
    if hardware is not None:
        plan, hw = predict(setup, hardware)
        section["predicted"] = {
            "hardware": hw.name, "step_time_s": plan.step_time_s, "tokens_per_s": tokens / plan.step_time_s,
            "memory_gib": plan.memory_gib["total"], "mfu": plan.mfu,
            "step_time_error": plan.step_time_s / statistics.median(step_times) - 1,
            "memory_error": plan.memory_gib["total"] / real["peak_rss_gib"] - 1 if device.type == "cpu" else
            (plan.memory_gib["total"] / real["peak_device_memory_gib"] - 1 if real["peak_device_memory_gib"] else None),
            "command": f"longcat plan train --model {subject.spec} --hardware {hardware} --chips 1 "
                       f"--seq-len {suite.train_seq_len} --global-batch-tokens {tokens} --precision autocast "
                       f"--stack pytorch-eager --layout tp=1,pp=1,ep=1,cp=1,dp=1,zero=0,recompute=none,"
                       f"microbatch={suite.train_micro_batch}",
        }
    else:
        section["predicted"] = None
        section["predicted_reason"] = hw_reason
    return section, hw


def decode_section(subject, suite: Suite, device: torch.device, clock: str, log, tick, *, model=None,
                   layout: str = SINGLE_PROCESS) -> dict:
    """Prefill and decode latency and throughput per (batch, prompt, output) cell on the Engine.
    `model`: an already built one (a rank's shard of a distributed generation, `layout`); default
    the subject in fp32 on `device`."""
    from ..infer import SamplingParams
    from ..model import LatentCache
    from .common import Timer, random_prompts
    from .infer_bench import _engines

    timer = Timer(clock, device)
    if model is None:
        model = subject.build(device).float()
    model = model.eval()
    engines = _engines(model, suite.decode_modes)
    cells = []
    for mode, engine in engines.items():
        for batch in suite.decode_batches:
            for prompt_len in suite.decode_prompts:
                for new in suite.decode_outputs:
                    prompts = random_prompts([prompt_len] * batch, subject.config.vocab_size, seed=prompt_len + batch)
                    full = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
                    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
                    prefill_s, decode_s, produced = [], [], []
                    for r in range(suite.decode_repeats + 1):  # round 0 warms up (and compiles)
                        t0 = timer()
                        engine.generate(prompts, one)
                        t1 = timer()
                        results = engine.generate(prompts, full)
                        t2 = timer()
                        if r:
                            prefill_s.append(t1 - t0)
                            decode_s.append((t2 - t1) - (t1 - t0))  # a full generation minus its prefill
                            produced.append(sum(len(x.token_ids) for x in results))
                    pre, dec = statistics.median(prefill_s), statistics.median(decode_s)
                    cell = {"mode": mode, "batch": batch, "prompt_tokens": prompt_len, "output_tokens": new,
                            "workload": f"b{batch}-p{prompt_len}-o{new}", "precision": "fp32", "layout": layout,
                            "prefill_latency_s": spread(prefill_s),
                            "prefill_tok_per_s": batch * prompt_len / pre,
                            "decode_latency_per_token_s": dec / (new - 1) if dec > 0 else None,
                            "decode_tok_per_s": batch * (new - 1) / dec if dec > 0 else None,
                            "decode_s": spread(decode_s),
                            "all_tokens_produced": all(p == batch * new for p in produced)}
                    if dec <= 0:
                        cell["decode_reason"] = "decode time not above the prefill time's noise: raise the output length"
                    cells.append(cell)
                    log(f"decode {mode} b{batch} p{prompt_len} o{new}: prefill {pre * 1e3:.1f} ms, "
                        f"decode {cell['decode_tok_per_s'] or float('nan'):.1f} tok/s")
                    tick()
    engine = next(iter(engines.values()))
    cache = engine.cache_for(1, 1)
    section: dict[str, Any] = {
        "clock": clock, "threads": torch.get_num_threads(), "warmup_rounds_excluded": 1, "layout": layout,
        "method": "prefill = a 1-token generation; decode = a full generation minus that; medians over repeats",
        "prompts": "random token ids, seed = prompt length + batch", "cells": cells,
        "cache_bytes_per_token": cache.nbytes() / (cache.allocated_rows * cache.max_len),
        "cache_bytes_per_token_latent": LatentCache.bytes_per_token(subject.config, dtype_bytes=4),
    }
    if subject.config.mtp_num_layers == 0:
        section["mtp"] = None
        section["mtp_reason"] = "the model has no MTP heads"
    elif layout != SINGLE_PROCESS:
        section["mtp"] = None
        section["mtp_reason"] = (f"measured in one process only; this decode ran on {layout} (drop --nproc for MTP "
                                 "acceptance)")
    elif not subject.trained:
        section["mtp"] = None
        section["mtp_reason"] = ("fresh preset weights: MTP acceptance would measure an untrained head; give a trained "
                                 "--model DIR (make demo writes runs/demo)")
    else:
        from .infer_bench import run_speculative_bench

        spec = run_speculative_bench(str(subject.path), new_tokens=max(suite.decode_outputs), rounds=2, drafts=(1, 2),
                                     timer=timer, modes=suite.decode_modes[:1], log=log)
        section["mtp"] = spec
    return section


# --- N ranks ------------------------------------------------------------------------------------------


@dataclass
class RankPlan:
    """How `--nproc N --parallel LAYOUT` runs: the training layout, and the inference layout the
    decode cells run on (None with the reason when generation cannot run on these ranks)."""

    processes: int
    train_layout: Any  # ParallelLayout
    train_overrides: list[str]
    decode_layout: Any | None
    decode_reason: str | None

    def describe(self) -> dict:
        return {"processes": self.processes, "train_layout": str(self.train_layout),
                "decode_layout": str(self.decode_layout) if self.decode_layout is not None else None,
                **({"decode_layout_reason": self.decode_reason} if self.decode_reason else {}),
                "launcher": "torchrun (longcat.parallel.launch), one node"}


def train_overrides(suite: Suite, device: torch.device) -> list[str]:
    """The `longcat train --set` items that give the Trainer the suite's training workload."""
    return [f"train.seq_len={suite.train_seq_len}", f"train.micro_batch={suite.train_micro_batch}",
            "train.grad_accum=1", "train.precision=bf16", "train.optimizer=adamw", f"train.device={device.type}",
            "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "train.tensorboard=false",
            "train.log_every=0", "train.checkpoint_every=0", "train.keep_checkpoints=1"]


def plan_ranks(subject, suite: Suite, device: torch.device, nproc: int, parallel: str | None) -> RankPlan:
    """Check `--nproc N --parallel LAYOUT` against the model before anything runs. Training uses the
    layout (default dp_shard=N, as `longcat train`); decoding uses it too when it is an inference
    layout (tp and ep only), else what `longcat generate --nproc N` uses (tp=N,ep=N)."""
    from ..config import ConfigError
    from ..errors import UserError
    from ..parallel.layout import ParallelLayout
    from ..train.config import RunConfig, build_run_config
    from ..train.distributed import check_parallel_run

    overrides = train_overrides(suite, device)
    run = RunConfig(model=subject.config, train=build_run_config(overrides=overrides).train)
    try:
        layout = check_parallel_run(run, parallel, nproc)
    except ConfigError as exc:
        raise UserError(f"{exc} (bench run trains {suite.train_micro_batch} x {suite.train_seq_len} tokens per step "
                        f"of {subject.name} with every loss of its recipe: choose a layout that allows that)") from None
    given = ParallelLayout.parse(parallel) if parallel else None
    inference_only = given is not None and all(getattr(given, d) == 1 for d in ("pp", "dp_replicate", "dp_shard", "cp"))
    decode = given if inference_only else ParallelLayout(tp=nproc, ep=nproc)
    reason = None
    try:
        decode.validate_inference(subject.config, nproc)
    except ConfigError as exc:
        decode, reason = None, f"no inference layout of {nproc} ranks fits this model: {exc}"
    if decode is not None and "compiled" in suite.decode_modes:
        reason = "compiled decoding runs in one process only; the decode cells on ranks are eager"
    return RankPlan(nproc, layout, overrides, decode, reason)


def _per_rank_threads(threads: int, nproc: int, device: torch.device) -> int:
    """The ranks share the CPU's cores: each gets its share of --threads (at least one)."""
    return max(1, threads // nproc) if device.type == "cpu" else threads


def train_section_ranks(subject, suite: Suite, device: torch.device, threads: int, plan: RankPlan,
                        hardware: str | None, out: Path, peak: dict, log) -> dict:
    """Training on N ranks through `longcat train --nproc N --parallel LAYOUT` (the one Trainer),
    read back from its metrics.jsonl: step times after warm-up, tokens/s, model FLOP/s, MFU and each
    rank's peak memory (the Trainer records the maximum over ranks)."""
    import shutil
    import subprocess
    import sys

    from ..errors import UserError
    from ..infer.cli import find_tokenizer

    run_dir = out / "train-ranks"
    marker = run_dir / ".longcat-bench-run"
    if run_dir.exists():
        if not marker.exists():
            raise UserError(f"{run_dir} exists and was not written by `longcat bench run`; move it away or choose "
                            "another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    marker.write_text("written by longcat bench run; replaced by the next run into this folder\n")
    config_file = run_dir / "model.toml"
    subject.config.save(config_file)
    per_rank = _per_rank_threads(threads, plan.processes, device)
    steps = suite.train_warmup + suite.train_steps
    cmd = [sys.executable, "-m", "longcat.cli", "train", "--config", str(config_file), "--out", str(run_dir / "run"),
           "--steps", str(steps), "--nproc", str(plan.processes), "--parallel", str(plan.train_layout),
           "--threads", str(per_rank), "--seed", "0", "--no-progress", "--max-bytes", str(TRAIN_CORPUS_BYTES),
           "--peak-tflops", f"{peak['peak_flops'] / 1e12:.6g}"]
    tokenizer = find_tokenizer(subject.path, Path(subject.spec)) if subject.path is not None else None
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    for item in plan.train_overrides:
        cmd += ["--set", item]
    log(f"train: {steps} steps on {plan.processes} ranks ({plan.train_layout}), {per_rank} thread(s) each: "
        "longcat train --nproc ...")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": str(per_rank)})
    (run_dir / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise UserError(f"the training on {plan.processes} ranks failed (exit {proc.returncode}): "
                        f"{' | '.join(tail)} (full output: {run_dir / 'train.log'})")
    records = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    for bulky in ("checkpoints", "cache"):  # the report keeps the metrics, the tokenizer and the log
        shutil.rmtree(run_dir / "run" / bulky, ignore_errors=True)
    train = [r for r in records if r.get("kind") == "train"]
    measured = train[suite.train_warmup:]
    if len(train) != steps or not measured:
        raise UserError(f"the training on {plan.processes} ranks recorded {len(train)} of {steps} steps; see "
                        f"{run_dir / 'train.log'}")
    tokens = suite.train_seq_len * suite.train_micro_batch
    step_times = [tokens / r["tokens_per_s"] for r in measured]
    flops_tok = statistics.median(r["model_flops_per_token"] for r in measured)
    # the ranks share one CPU (its peak is the machine's); on accelerators each rank has its own
    shared = device.type == "cpu"
    denominator = peak["peak_flops"] * (1 if shared else plan.processes)
    source = peak["source"] + (f" (the {plan.processes} ranks share this CPU)" if shared
                               else f" x {plan.processes} ranks")
    rank_peak = max(r["mem_peak_gib"] for r in train)
    section: dict[str, Any] = {
        "workload": {"seq_len": suite.train_seq_len, "micro_batch": suite.train_micro_batch, "tokens_per_step": tokens,
                     "data": f"the embedded corpus (first {TRAIN_CORPUS_BYTES >> 20} MiB), tokenized",
                     "optimizer": "AdamW (the Trainer)", "grad_accum": 1},
        "precision": "bf16 autocast, fp32 master weights",
        "layout": str(plan.train_layout), "processes": plan.processes, "threads_per_rank": per_rank,
        "entry_point": "longcat train --nproc N --parallel LAYOUT (the Trainer)",
        "command": " ".join(["longcat", *cmd[3:]]),
        **_throughput(suite, step_times, flops_tok, denominator, source),
        "clock": "wall", "threads": per_rank * plan.processes,
        "peak_rank_memory_gib": rank_peak,
        "peak_rank_memory_kind": ("peak RSS (ru_maxrss) of each rank, the largest over ranks" if device.type != "cuda"
                                  else "torch.cuda.max_memory_allocated of each rank, the largest over ranks"),
        "peak_rss_gib": rank_peak if device.type != "cuda" else None,
        "peak_device_memory_gib": rank_peak if device.type == "cuda" else None,
        "step_times_s": step_times,
        "zero_expert_share": statistics.median(r["zero_expert_share"] for r in measured),
    }
    if device.type == "cuda":
        section["peak_rss_reason"] = "the Trainer records device memory on CUDA: see peak_device_memory_gib"
    else:
        section["peak_device_memory_reason"] = ("the CPU has no device allocator: peak_rss_gib is the memory"
                                                if device.type == "cpu" else
                                                f"the Trainer records each rank's RSS on {device.type}")
    section["predicted"], reason = predict_ranks(subject, suite, device, plan, hardware, step_times, rank_peak)
    if reason:
        section["predicted_reason"] = reason
    return section


def predict_ranks(subject, suite: Suite, device: torch.device, plan: RankPlan, hardware: str | None,
                  step_times: list[float], peak_gib: float) -> tuple[dict | None, str | None]:
    """The planner on the same layout and chip count, or None and why."""
    if hardware is None and device.type == "cpu":
        return None, (f"the {plan.processes} ranks share this CPU's cores while the planner models one chip per "
                      "rank; give --hardware NAME|FILE for a per-rank entry, or drop --nproc for the calibrated "
                      "one-process prediction")
    if hardware is None:
        from .environment import catalog_entry_for

        hardware = catalog_entry_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if hardware is None:
            return None, f"no hardware entry names this {device.type} device: pass --hardware NAME|FILE.toml"
    from ..plan.arch import from_longcat
    from ..plan.hardware import load_hardware, load_stack
    from ..plan.layout import Layout
    from ..plan.train import Planner, TrainSetup

    tokens = suite.train_seq_len * suite.train_micro_batch
    hw = load_hardware(hardware)
    setup = TrainSetup(from_longcat(subject.config, name=subject.name), hw, load_stack("pytorch-eager"),
                       chips=plan.processes, seq_len=suite.train_seq_len, global_batch_tokens=tokens,
                       optimizer="adamw", precision="autocast")
    pl = plan.train_layout
    layout = Layout(pl, zero=3 if pl.fsdp else 0, recompute="none",
                    microbatch=max(1, suite.train_micro_batch // pl.dp))
    planner = Planner(setup)
    rejected = planner.check(layout)
    result = None if rejected else planner.evaluate(layout)
    if result is None:
        return None, f"the planner finds no plan for {layout} on {hw.name}" + (f": {'; '.join(rejected)}"
                                                                               if rejected else "")
    total = result.memory_gib["total"]
    return {"hardware": hw.name, "layout": str(layout), "step_time_s": result.step_time_s,
            "tokens_per_s": tokens / result.step_time_s, "memory_gib": total, "memory_per": "rank",
            "mfu": result.mfu, "step_time_error": result.step_time_s / statistics.median(step_times) - 1,
            "memory_error": total / peak_gib - 1 if peak_gib else None}, None


def decode_section_ranks(subject, suite: Suite, device: torch.device, threads: int, plan: RankPlan, out: Path,
                         log) -> dict:
    """The decode cells on N ranks: every rank runs `decode_section` on its shard of the model
    (`longcat.parallel.inference`, the path `longcat generate --nproc` takes), in lockstep: each
    generation is collective. Rank 0's timings are the cells; each rank's peak memory is kept."""
    import tempfile
    from dataclasses import asdict

    from ..errors import UserError
    from ..parallel.launch import launch

    per_rank = _per_rank_threads(threads, plan.processes, device)
    with tempfile.TemporaryDirectory(prefix="longcat-decode-ranks-") as tmp:
        job = {"model": str(subject.path) if subject.path is not None else subject.spec, "device": str(device),
               "layout": str(plan.decode_layout), "threads": per_rank, "out": tmp,
               "suite": {**asdict(suite), "decode_modes": ["eager"]}}
        log(f"decode: {plan.processes} ranks ({plan.decode_layout}), {per_rank} thread(s) each ...")
        proc = launch(["-m", "longcat.bench.report", json.dumps(job)], nproc=plan.processes,
                      threads_per_rank=per_rank, capture=True)
        (out / "decode-ranks.log").write_text(proc.stdout or "")
        if proc.returncode:
            tail = (proc.stdout or "").strip().splitlines()[-3:]
            raise UserError(f"the decode on {plan.processes} ranks failed (exit {proc.returncode}): "
                            f"{' | '.join(tail)} (full output: {out / 'decode-ranks.log'})")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(plan.processes)]
    section = ranks[0]["section"]
    section["processes"] = plan.processes
    section["threads_per_rank"] = per_rank
    section["peak_rank_rss_gib"] = max(r["peak_rss_gib"] for r in ranks)
    section["rank_weight_bytes"] = [r["weight_bytes"] for r in ranks]
    section["method"] += "; timed on rank 0, every rank generating the same tokens in lockstep"
    return section


def _decode_rank(job: dict) -> None:
    """One rank of `decode_section_ranks` (under torchrun)."""
    from ..devices import resolve_device
    from ..model import build_model
    from ..parallel.inference import load_for_inference, local_bytes, setup_inference, shard_for_inference
    from ..parallel.layout import device_type_for, shutdown_distributed
    from ..plan.calibrate import peak_rss_bytes
    from .subject import resolve_subject

    torch.set_num_threads(job["threads"])
    subject = resolve_subject(job["model"])
    device = resolve_device(job["device"], setting="--device")
    if device.type != "cpu" and device.index is None:  # one accelerator per rank of this node
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
    ranks = setup_inference(job["layout"], subject.config, device_type=device_type_for(device))
    if subject.path is None:
        model = shard_for_inference(build_model(subject.config, seed=0), ranks).to(device)
    else:
        model = load_for_inference(subject.path, ranks, device=device, dtype=torch.float32)
    suite = Suite(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["suite"].items()})
    quiet = (lambda line: None) if ranks.rank else (lambda line: print(line, flush=True))
    section = decode_section(subject, suite, device, "wall", quiet, lambda: None, model=model, layout=job["layout"])
    result = {"rank": ranks.rank, "section": section, "peak_rss_gib": peak_rss_bytes() / GiB,
              "weight_bytes": local_bytes(model)}
    (Path(job["out"]) / f"rank{ranks.rank}.json").write_text(json.dumps(result, default=_json_default))
    shutdown_distributed()


# --- serve --------------------------------------------------------------------------------------------


def serve_model_dir(subject, out: Path, log) -> Path:
    """A folder `longcat serve` can serve the report's model from, with a tokenizer (the load is
    text): the model's own folder when it has tokenizer.json; otherwise its weights (a preset: seed
    0, as measured everywhere else in the report) saved with a BPE tokenizer of the model's
    vocabulary trained on the embedded corpus."""
    from ..data import iter_documents, train_tokenizer
    from ..infer.cli import find_tokenizer
    from ..interop.native import save_model

    if subject.path is not None and find_tokenizer(subject.path, Path(subject.spec)) is not None:
        return Path(subject.spec)
    folder = out / "serve-model"
    log(f"serve: saving {subject.name} with a {subject.config.vocab_size}-token tokenizer to {folder} ...")
    docs = iter_documents(None, split="train", max_bytes=SERVE_TOKENIZER_BYTES)
    tokenizer = train_tokenizer(docs, vocab_size=subject.config.vocab_size, show_progress=False)
    return save_model(subject.build("cpu").float(), folder, tokenizer_json=tokenizer.to_json())


def serve_section(subject, suite: Suite, out: Path, *, start: bool, url: str | None, device: torch.device,
                  threads: int, log) -> dict:
    """A short seeded load through `longcat bench serve`'s generator: against our own server started
    on 127.0.0.1 with the report's model (`start`), or against `url` (anyone's OpenAI-compatible
    server). Latencies in ms (mean, p50, p90, p99) and throughputs."""
    from .serve_load import load_test, start_server, stop_server

    proc = None
    if start:
        model_dir = serve_model_dir(subject, out, log)
        log(f"serve: starting longcat serve --model {model_dir} on 127.0.0.1 ...")
        proc, url, _ = start_server(str(model_dir), max_running=suite.serve_concurrency, threads=threads,
                                    device=str(device))
        target = {"kind": "started by bench run", "model": subject.name, "config_hash": subject.config_hash,
                  "command": f"longcat serve --model {model_dir} --host 127.0.0.1 --port 0 --max-running "
                             f"{suite.serve_concurrency} --threads {threads} --device {device}",
                  "layout": SINGLE_PROCESS}
    else:
        target = {"kind": "external server (--serve-url)", "model": None, "config_hash": None, "command": None,
                  "layout": None, "layout_reason": "another server: its layout is not known here"}
    try:
        result = load_test(url, num_prompts=suite.serve_prompts, input_len=suite.serve_input_len,
                           output_len=suite.serve_output_len, concurrency=suite.serve_concurrency, seed=0,
                           warmup=suite.serve_warmup, log=log)
    finally:
        if proc is not None:
            stop_server(proc)
    load = result["load"]
    target.update(url=result["url"], served_model=result["model"])
    section: dict[str, Any] = {
        "target": target,
        "workload": {"generator": "longcat bench serve (seeded words, streaming /v1/completions, temperature 0, "
                                  "ignore_eos)", "seed": 0, "num_prompts": suite.serve_prompts,
                     "input_words_mean": suite.serve_input_len, "output_tokens_mean": suite.serve_output_len,
                     "range_ratio": result["range_ratio"], "concurrency": suite.serve_concurrency,
                     "arrival": "all at once, at most `concurrency` in flight", "warmup_requests": suite.serve_warmup,
                     "name": f"n{suite.serve_prompts}-i{suite.serve_input_len}-o{suite.serve_output_len}-"
                             f"c{suite.serve_concurrency}"},
        "requests": load["requests"], "completed": load["completed"], "failed": load["failed"],
        "errors": load["errors"], "duration_s": load["duration_s"],
        "prompt_tokens": load["prompt_tokens"], "output_tokens": load["output_tokens"],
        "requests_per_s": load["request_throughput"], "output_tok_per_s": load["output_throughput"],
        "total_tok_per_s": (load["prompt_tokens"] + load["output_tokens"]) / load["duration_s"],
        "ttft_ms": load["ttft_ms"], "tpot_ms": load["tpot_ms"], "itl_ms": load["itl_ms"], "e2el_ms": load["e2el_ms"],
        "definitions": "TTFT: send to first streamed text; TPOT: (e2e - TTFT) / (output tokens - 1); ITL: between "
                       "streamed chunks; E2EL: send to last chunk (as vLLM's and SGLang's serving benchmarks)",
    }
    if load["completed"] < load["requests"]:
        section["failed_reason"] = f"{load['failed']} of {load['requests']} requests failed: {load['errors'][:2]}"
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        if section[key]["p50"] is None:
            section[key]["reason"] = "no completed request streamed enough tokens to measure it"
    return section


def energy_now(telemetry) -> float | None:
    """The sum of the energy counters (joules) readable now, or None when there is none."""
    from ..telemetry import ENERGY_COUNTERS

    values = telemetry.read()
    found = [values[k] for k in ENERGY_COUNTERS if k in values]
    return sum(found) if found else None


def _plot(fn: Callable, path: Path, notes: dict, key: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes[key] = "matplotlib is not installed (pip install matplotlib)"
        return
    fig = fn(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    notes[key] = path.name


def write_plots(report: dict, out: Path, samples: list[dict]) -> dict:
    """PNG files next to the report; {plot: file name or why not}."""
    from .numerics import plot_drift
    from .oom import plot_frontier

    plots: dict[str, str] = {}
    train = report["results"]["train"]
    if train:
        def train_plot(plt):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(range(1, len(train["step_times_s"]) + 1), train["step_times_s"], "o-", label="measured")
            if train.get("predicted"):
                ax.axhline(train["predicted"]["step_time_s"], color="gray", ls="--", label="planner")
            ax.set_xlabel("measured step (after warm-up)")
            ax.set_ylabel("step time (s)")
            ax.set_ylim(bottom=0)
            ax.legend()
            ax.grid(alpha=0.3)
            return fig
        _plot(train_plot, out / "train.png", plots, "train")
    decode = report["results"]["decode"]
    if decode and decode.get("cells"):
        def decode_plot(plt):
            cells = decode["cells"]
            fig, ax = plt.subplots(figsize=(7, 3.5))
            labels = [f"{c['mode']}\n{c['workload']}" for c in cells]
            # an unmeasured cell has no bar (NaN), not a bar of height 0
            ax.bar(labels, [c["decode_tok_per_s"] if c["decode_tok_per_s"] is not None else float("nan")
                            for c in cells])
            ax.set_ylabel("decode tokens/s (aggregate)")
            ax.tick_params(axis="x", rotation=45, labelsize=7)
            ax.grid(alpha=0.3, axis="y")
            return fig
        _plot(decode_plot, out / "decode.png", plots, "decode")
    if samples:
        def telemetry_plot(plt):
            fig, ax = plt.subplots(figsize=(7, 3.2))
            t = [s["t_s"] for s in samples]
            ax.plot(t, [s.get("rss_bytes", float("nan")) / GiB for s in samples], label="RSS (GiB)")
            ax.plot(t, [s.get("children_rss_bytes", float("nan")) / GiB for s in samples], label="children RSS (GiB)")
            ax.set_xlabel("seconds")
            ax.set_ylabel("GiB")
            ax2 = ax.twinx()
            ax2.plot(t, [s.get("cpu_percent", float("nan")) + s.get("children_cpu_percent", 0.0) for s in samples],
                     color="tab:red", alpha=0.5, label="CPU % (with children)")
            ax2.set_ylabel("CPU % (this process)")
            ax.legend(loc="upper left")
            ax2.legend(loc="upper right")
            return fig
        _plot(telemetry_plot, out / "telemetry.png", plots, "telemetry")
    frontier = report["results"]["oom_frontier"]
    if frontier and frontier.get("measured"):
        plots["oom_frontier"] = plot_frontier(frontier, out / "oom_frontier.png") or "oom_frontier.png"
    numerics = report["results"]["numerics"]
    if numerics and numerics.get("inference"):
        plots["numerics"] = plot_drift(numerics, out / "numerics.png") or "numerics.png"
    return plots


# --- the run -----------------------------------------------------------------------------------------


def run_report(model: str, out: Path, *, suite: str | Suite = "quick", device: str = "cpu", threads: int | None = None,
               clock: str = "wall", hardware: str | None = None, peak_tflops: float | None = None,
               nproc: int = 1, parallel: str | None = None, serve: bool = False, serve_url: str | None = None,
               skip: tuple[str, ...] = (), argv: list[str] | None = None, progress: bool = True, log=print) -> dict:
    """Measure `model` into `out` (report.json, report.md, plots, telemetry.jsonl); the report.
    `nproc` > 1: train (and decode, where generation supports the layout) on that many ranks;
    `serve`: start our server with the model for the serve section; `serve_url`: load another's."""
    from ..devices import resolve_device
    from ..telemetry import Telemetry
    from .environment import describe_environment, load_average, peak_flops
    from .subject import resolve_subject

    chosen = SUITES[suite] if isinstance(suite, str) else suite  # a Suite of its own: tests shrink the workloads
    subject = resolve_subject(model)
    dev = resolve_device(device, setting="--device")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = load_average()
    env = describe_environment(argv)
    results: dict[str, Any] = {k: None for k in ("train", "decode", "serve", "memory", "oom_frontier", "numerics")}
    reasons: dict[str, str] = {}
    notes: list[str] = []
    sections = [s for s in ("train", "decode", "oom_frontier", "numerics") if s not in skip]
    ranks = plan_ranks(subject, chosen, dev, nproc, parallel) if nproc > 1 else None
    decode_cells = len(chosen.decode_modes) * len(chosen.decode_batches) * len(chosen.decode_prompts) * \
        len(chosen.decode_outputs)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]bench run"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.description}"), TimeElapsedColumn(), disable=not progress, transient=False)
    telemetry = Telemetry(dev, interval_s=0.5, children=True)  # training and OOM trials run in children
    with bar, telemetry:
        task = bar.add_task("environment", total=len(sections) + decode_cells + bool(serve or serve_url))

        def say(line: str) -> None:
            bar.console.print(line, highlight=False, markup=False) if progress else log(line)

        peak = peak_flops(dev, user_tflops=peak_tflops)
        hw = None
        if "train" in sections:
            bar.update(task, description="train")
            energy_before = energy_now(telemetry)
            if ranks is None:
                results["train"], hw = train_section(subject, chosen, dev, clock, threads, hardware, out, peak, say)
            else:
                results["train"] = train_section_ranks(subject, chosen, dev, threads, ranks, hardware, out, peak, say)
            energy_after = energy_now(telemetry)
            train_energy = None if energy_before is None or energy_after is None else energy_after - energy_before
            if hw is not None and peak_tflops is None and dev.type == "cpu":
                peak = peak_flops(dev, hardware=hw)  # the calibration's peak: the planner's own denominator
                tr = results["train"]
                tr["mfu"] = tr["hfu"] = tr["model_flops_per_s"] / peak["peak_flops"]
                tr["mfu_denominator_flops_per_s"], tr["mfu_denominator_source"] = peak["peak_flops"], peak["source"]
            bar.advance(task)
        else:
            reasons["train"] = "skipped (--skip train)"
        if "decode" in sections:
            bar.update(task, description="decode")
            telemetry.record_fields()  # starts a new peak window
            if ranks is None:
                results["decode"] = decode_section(subject, chosen, dev, clock, say, lambda: bar.advance(task))
            elif ranks.decode_layout is not None:
                results["decode"] = decode_section_ranks(subject, chosen, dev, threads, ranks, out, say)
                bar.advance(task, decode_cells)
            else:
                reasons["decode"] = ranks.decode_reason
                bar.advance(task, decode_cells)
            window = telemetry.record_fields()
            if results["decode"] is not None:
                results["decode"]["process_peak_rss_gib"] = window["rss_gib"]
                results["decode"]["process_peak_device_memory_gib"] = window["device_mem_gib"]
                if window["device_mem_gib"] is None:
                    results["decode"]["process_peak_device_memory_reason"] = telemetry.backends()["device_memory"]
            bar.advance(task)
        else:
            reasons["decode"] = "skipped (--skip decode)"
        if serve or serve_url:
            bar.update(task, description="serve")
            results["serve"] = serve_section(subject, chosen, out, start=serve, url=serve_url, device=dev,
                                             threads=threads, log=say)
            bar.advance(task)
        else:
            reasons["serve"] = ("not asked: --serve starts our server with this model for a short seeded load; "
                                "--serve-url URL measures a running OpenAI-compatible server")
        if "oom_frontier" in sections:
            bar.update(task, description="oom frontier")
            from .oom import run_frontier

            results["oom_frontier"] = run_frontier(
                str(subject.path) if subject.path else subject.spec, mode="train", seq_lens=chosen.oom_seq_lens,
                memory_gib=chosen.oom_memory_gib, skews=chosen.oom_skews, device=str(dev), threads=1,
                max_batch=chosen.oom_max_batch, log=say)
            bar.advance(task)
        else:
            reasons["oom_frontier"] = "skipped (--skip oom_frontier)"
        if "numerics" in sections:
            bar.update(task, description="numerics")
            from .numerics import run_numerics

            results["numerics"] = run_numerics(subject, tokens=chosen.numerics_tokens,
                                               train_steps=chosen.numerics_train_steps, log=say)
            bar.advance(task)
        else:
            reasons["numerics"] = "skipped (--skip numerics)"
        bar.update(task, description="done")

    summary = telemetry.summary()
    with open(out / "telemetry.jsonl", "w") as f:
        for s in telemetry.samples:
            f.write(json.dumps(s) + "\n")
    from ..model import count_parameters

    train = results["train"]
    counts = count_parameters(subject.config)
    results["memory"] = {
        "weights_fp32_gib": counts.total * 4 / GiB,
        "train_peak_rss_gib": train["peak_rss_gib"] if train else None,
        "train_predicted_gib": train["predicted"]["memory_gib"] if train and train.get("predicted") else None,
        "train_peak_device_memory_gib": train["peak_device_memory_gib"] if train else None,
        "train_peak_rank_memory_gib": train.get("peak_rank_memory_gib") if train else None,
        "decode_peak_rank_rss_gib": (results["decode"] or {}).get("peak_rank_rss_gib"),
        "decode_cache_bytes_per_token": results["decode"]["cache_bytes_per_token"] if results["decode"] else None,
        "process_peak_rss_gib": summary["fields"].get("rss_bytes", {}).get("peak", 0) / GiB or None,
        "oom_budget_gib": results["oom_frontier"]["memory_budget_gib"] if results["oom_frontier"] else None,
    }
    for key, value in list(results["memory"].items()):
        if value is None:
            own = {"train_predicted_gib": (train or {}).get("predicted_reason"),
                   "train_peak_device_memory_gib": (train or {}).get("peak_device_memory_reason"),
                   "train_peak_rss_gib": (train or {}).get("peak_rss_reason")}.get(key)
            results["memory"][key.removesuffix("_gib") + "_reason"] = own or (
                "measured on N ranks only (--nproc)" if "_rank_" in key and ranks is None else
                "not measured in this run (section skipped, or the device has no allocator of its own)")
    tokens_total = None
    if train:
        tokens_total = train["workload"]["tokens_per_step"] * len(train["step_times_s"])
    energy = {"energy_j": summary["energy_j"], "source": summary["energy_source"], "reason": summary["energy_reason"],
              "train_energy_j": None, "train_tokens_per_j": None}
    if train and "train" in sections and train_energy:
        w = train["workload"]
        trained = w["tokens_per_step"] * (train["warmup_steps_excluded"] + len(train["step_times_s"]))
        energy.update(train_energy_j=train_energy, train_tokens_per_j=trained / train_energy,
                      train_note="over the training child process, start-up and warm-up steps included")
    else:
        energy["train_reason"] = summary["energy_reason"] or "the train section did not run"
    results["energy"] = energy
    load_after = load_average()
    cores = env["cpu"]["usable_cores"] or 1
    shared = None if load_before is None else load_before[0] > 0.5
    if shared:
        notes.append(f"the machine was busy before the run started (load average {load_before[0]:.2f} on {cores} "
                     "cores): other work competed for the cores, so times are pessimistic and noisier")
    if clock == "cpu":
        notes.append("times are process CPU seconds (--clock cpu), not wall time: compare only with --clock cpu reports")
    if ranks is not None:
        notes.append(f"train ran on {nproc} ranks ({ranks.train_layout}) through `longcat train --nproc`, decode on "
                     + (f"{nproc} ranks ({ranks.decode_layout})" if ranks.decode_layout is not None else
                        "none (see reasons.decode)")
                     + ": compare only with reports of the same layout (`bench compare` refuses the others)")
        if dev.type == "cpu":
            notes.append(f"the {nproc} ranks share this CPU's {env['cpu']['usable_cores']} cores: the N-rank numbers "
                         "show the parallel code's overheads, not a speed-up")
    if ranks is not None and ranks.decode_reason and ranks.decode_layout is not None:
        notes.append(ranks.decode_reason)
    if not subject.trained:
        notes.append("a preset with fresh weights: speeds are representative, numerics and MTP acceptance are not")
    report = {
        "schema": SCHEMA,
        "run": {"id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)), "suite": chosen.name,
                "command": env["command"], "git_commit": env["git"].get("commit"), "seeds": {"workload": 0, "model": 0},
                "duration_s": time.time() - started},
        "environment": {**env, "device": str(dev), "threads": threads, "clock": clock,
                        "processes": nproc, "layout": str(ranks.train_layout) if ranks else SINGLE_PROCESS,
                        "peak_flops_per_s": peak["peak_flops"], "peak_flops_source": peak["source"]},
        "model": subject.describe(),
        "parallelism": ranks.describe() if ranks else {"processes": 1, "train_layout": SINGLE_PROCESS,
                                                       "decode_layout": SINGLE_PROCESS},
        "workload": {"generator": "random token ids (torch.Generator, fixed seeds)", "seed": 0,
                     "train": {"seq_len": chosen.train_seq_len, "micro_batch": chosen.train_micro_batch},
                     "decode": {"batches": list(chosen.decode_batches), "prompt_tokens": list(chosen.decode_prompts),
                                "output_tokens": list(chosen.decode_outputs)},
                     "routing_skew": list(chosen.oom_skews),
                     "serve": {"prompts": chosen.serve_prompts, "input_words": chosen.serve_input_len,
                               "output_tokens": chosen.serve_output_len, "concurrency": chosen.serve_concurrency,
                               "arrival": "all at once, at most `concurrency` in flight (seeded)"}},
        "results": results,
        "reasons": reasons,
        "telemetry": {**summary, "samples_file": "telemetry.jsonl"},
        "validity": {
            "warmup_excluded": {"train_steps": chosen.train_warmup, "decode_rounds": 1},
            "repeats": {"train_steps": chosen.train_steps, "decode": chosen.decode_repeats},
            "train_step_relative_spread": train["step_time_s"]["relative_spread"] if train else None,
            "load_average_before": load_before, "load_average_after": load_after, "usable_cores": cores,
            "machine_shared": shared,
            "processes": nproc, "layout": str(ranks.train_layout) if ranks else SINGLE_PROCESS,
            "machine_shared_rule": "load average (1 min) above 0.5 before the run started",
            "notes": notes,
        },
    }
    report["plots"] = write_plots(report, out, telemetry.samples)
    check_report(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(report))
    return report


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# --- checks and rendering ------------------------------------------------------------------------------


def walk_numbers(node, path: str = ""):
    """(path, value) for every number in a report."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk_numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def check_report(report: dict) -> None:
    """Every number finite; every null result section with a reason. Raises ValueError naming the first problem."""
    if report.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA}, got {report.get('schema')!r}")
    for path, value in walk_numbers(report):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value}: a value that cannot be measured must be null with a reason")
    for name, value in report["results"].items():
        if value is None and not report["reasons"].get(name):
            raise ValueError(f"results.{name} is null without a reason in reasons.{name}")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def render_markdown(report: dict) -> str:
    env, res, model = report["environment"], report["results"], report["model"]
    acc = ", ".join(f"{a['name']} ({_fmt(a.get('memory_gib'))} GiB, {a.get('runtime')})" for a in env["accelerators"]) \
        or "none"
    lines = [
        f"# Validation report: {model['name']} ({report['run']['suite']} suite)",
        "",
        f"`{report['run']['command']}` — {report['run']['id']}, {report['run']['duration_s']:.0f} s, "
        f"schema `{report['schema']}`, commit `{(report['run']['git_commit'] or 'unknown')[:12]}`",
        "",
        "## Environment",
        "",
        f"- host {env['host']['name']}: {env['host']['os']}, Python {env['host']['python']}",
        f"- CPU {env['cpu']['model']}, {env['cpu']['usable_cores']} usable cores ({env['cpu']['logical_cores']} logical), "
        f"{_fmt(env['memory_gib'])} GiB memory; features {', '.join(env['cpu']['features']) or '–'}",
        f"- accelerators: {acc}; measured on `{env['device']}`, {env['threads']} thread(s), {env['clock']} clock",
        f"- processes: {env.get('processes', 1)}; train layout `{report['parallelism']['train_layout']}`, decode layout "
        f"`{report['parallelism']['decode_layout'] or 'none'}`",
        f"- MFU denominator {env['peak_flops_per_s'] / 1e9:,.1f} GFLOP/s: {env['peak_flops_source']}",
        f"- torch {env['versions'].get('torch')}, transformers {env['versions'].get('transformers')}, "
        f"longcat {env['versions'].get('longcat')}",
        f"- model: {model['total_params'] / 1e6:.1f}M parameters ({model['active_params'] / 1e6:.1f}M active), "
        f"{model['source']}, config hash `{model['config_hash']}`",
        "",
    ]
    tr = res["train"]
    lines += ["## Train", ""]
    if tr:
        pred = tr.get("predicted") or {}
        lines += [
            f"{tr['workload']['micro_batch']} x {tr['workload']['seq_len']} tokens per step, {tr['precision']}, "
            f"{tr['workload']['optimizer']}; {tr['step_time_s']['repeats']} steps after {tr['warmup_steps_excluded']} "
            f"warm-up; layout `{tr.get('layout', SINGLE_PROCESS)}`"
            + (f" on {tr['processes']} ranks (`{tr['command']}`)" if tr.get("processes", 1) > 1 else "") + ".",
            "",
            "| | measured | planner | error |",
            "|---|---:|---:|---:|",
            f"| step time (s) | {_fmt(tr['step_time_s']['median'])} (spread {_fmt(tr['step_time_s']['relative_spread'], 2)}) "
            f"| {_fmt(pred.get('step_time_s'))} | {_pct(pred.get('step_time_error'))} |",
            f"| tokens/s | {_fmt(tr['tokens_per_s'])} | {_fmt(pred.get('tokens_per_s'))} | |",
            f"| MFU | {tr['mfu']:.1%} | {_pct(pred.get('mfu'))} | |",
            f"| peak memory (GiB) | {_fmt(tr['peak_rss_gib'] or tr['peak_device_memory_gib'])}"
            f"{' per rank (max over ranks)' if tr.get('processes', 1) > 1 else ' RSS'} | {_fmt(pred.get('memory_gib'))} "
            f"| {_pct(pred.get('memory_error'))} |",
            "",
            *([f"Planner: {tr['predicted_reason']}.", ""] if tr.get("predicted_reason") else []),
            f"Model FLOP/s {tr['model_flops_per_s'] / 1e9:,.2f} G; HFU {tr['hfu']:.1%} ({tr['hardware_flops_note']}).",
            "",
        ]
        if "train" in report["plots"] and report["plots"]["train"].endswith(".png"):
            lines += ["![train step times](train.png)", ""]
    else:
        lines += [f"not measured: {report['reasons'].get('train')}", ""]
    dec = res["decode"]
    lines += ["## Decode", ""]
    if dec:
        lines += ["| mode | batch | prompt | output | prefill ms | prefill tok/s | decode tok/s | ms/token | all tokens |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in dec["cells"]:
            per_tok = c["decode_latency_per_token_s"]
            lines.append(f"| {c['mode']} | {c['batch']} | {c['prompt_tokens']} | {c['output_tokens']} | "
                         f"{c['prefill_latency_s']['median'] * 1e3:.1f} | {_fmt(c['prefill_tok_per_s'])} | "
                         f"{_fmt(c['decode_tok_per_s'])} | {_fmt(per_tok * 1e3 if per_tok else None)} | "
                         f"{'yes' if c['all_tokens_produced'] else 'NO'} |")
        lines += ["", f"Cache {dec['cache_bytes_per_token']:,.0f} bytes per token (latent size "
                  f"{dec['cache_bytes_per_token_latent']:,}). MTP: "
                  + (dec.get("mtp_reason") or "see report.json results.decode.mtp"), ""]
        if report["plots"].get("decode", "").endswith(".png"):
            lines += ["![decode throughput](decode.png)", ""]
    else:
        lines += [f"not measured: {report['reasons'].get('decode')}", ""]
    sv = res["serve"]
    lines += ["## Serve", ""]
    if sv:
        t, w = sv["target"], sv["workload"]
        lines += [f"{t['kind']}: `{t['served_model']}` at {t['url']}" + (f" (`{t['command']}`)" if t["command"] else "")
                  + f"; {w['num_prompts']} requests of ~{w['input_words_mean']} words in, ~{w['output_tokens_mean']} "
                  f"tokens out, {w['concurrency']} in flight, seed {w['seed']}, {w['warmup_requests']} warm-up "
                  "requests excluded.", "",
                  f"{sv['completed']} of {sv['requests']} completed in {sv['duration_s']:.2f} s: "
                  f"{_fmt(sv['requests_per_s'])} requests/s, {_fmt(sv['output_tok_per_s'])} output tok/s.", "",
                  "| ms | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|"]
        for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
            lines.append(f"| {name} | " + " | ".join(_fmt(sv[key][q]) for q in ("mean", "p50", "p90", "p99")) + " |")
        lines += ["", sv["definitions"] + ".", ""]
        if sv.get("failed_reason"):
            lines += [f"Failed: {sv['failed_reason']}", ""]
    else:
        lines += [f"not measured: {report['reasons'].get('serve')}", ""]
    mem = res["memory"]
    lines += ["## Memory", "", "| | GiB |", "|---|---:|"]
    lines += [f"| {k.removesuffix('_gib').replace('_', ' ')} | {_fmt(v)} |" for k, v in mem.items()
              if k.endswith("_gib")]
    lines.append("")
    fr = res["oom_frontier"]
    lines += ["## OOM frontier", ""]
    if fr:
        lines += [f"{fr['mode']} mode, {fr['memory_budget_gib']:g} GiB budget ({fr['cap']}); {fr['workload']}.", "",
                  "| skew | seq len | largest batch | limited by | planner |", "|---|---:|---:|---|---:|"]
        pred = {r["seq_len"]: r["max_batch"] for r in fr["predicted"] or []}
        for r in fr["measured"]:
            lines.append(f"| {r['skew']} | {r['seq_len']} | {r['max_batch']} | {r['limited_by']} | {pred.get(r['seq_len'])} |")
        lines += ["", f"Planner: {fr['predicted_basis'] or fr['predicted_reason']}.", ""]
        if report["plots"].get("oom_frontier", "").endswith(".png"):
            lines += ["![OOM frontier](oom_frontier.png)", ""]
    else:
        lines += [f"not measured: {report['reasons'].get('oom_frontier')}", ""]
    nu = res["numerics"]
    lines += ["## Numerics", ""]
    if nu:
        lines += [f"Against fp32 on {nu['held_out']}.", "",
                  "| precision | KL mean | KL p99 | top-1 agree | ln PPL ratio | RMS Δp | last-layer drift |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in nu["inference"].items():
            lines.append(f"| {name} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['top1_agreement']:.1%} | "
                         f"{r['ln_ppl_ratio']:+.2e} | {r['rms_delta_p']:.2e} | {r['layer_relative_drift'][-1]:.2e} |")
        t = nu["training"]
        lines += ["", f"Training {t['steps']} steps, bf16 autocast vs fp32 from the same init: relative area between the "
                  f"loss curves {t['loss_curve_relative_difference']:.2e}; spikes ({t['spike_rule']}): "
                  f"fp32 {len(t['spikes_fp32'])}, bf16 {len(t['spikes_bf16'])}."]
        if nu.get("note"):
            lines.append(f"Note: {nu['note']}.")
        lines.append("")
        if report["plots"].get("numerics", "").endswith(".png"):
            lines += ["![numerics](numerics.png)", ""]
    else:
        lines += [f"not measured: {report['reasons'].get('numerics')}", ""]
    tel = report["telemetry"]
    lines += ["## Telemetry", "",
              f"Every {tel['interval_s']:g} s, {tel['readings']} readings; backends: "
              + "; ".join(f"{k}: {v}" for k, v in tel["backends"].items()) + ".",
              f"Energy: {_fmt(tel['energy_j'])} J" + (f" ({tel['energy_source']})" if tel["energy_j"] is not None
                                                       else f" ({tel['energy_reason']})"), ""]
    if report["plots"].get("telemetry", "").endswith(".png"):
        lines += ["![telemetry](telemetry.png)", ""]
    val = report["validity"]
    lines += ["## Validity", "",
              f"- warm-up excluded: {val['warmup_excluded']}; repeats {val['repeats']}",
              f"- load average before {val['load_average_before']}, after {val['load_average_after']} on "
              f"{val['usable_cores']} cores: machine shared = {val['machine_shared']}",
              *[f"- {n}" for n in val["notes"]], ""]
    return "\n".join(lines)


if __name__ == "__main__":  # a rank of decode_section_ranks, under torchrun
    import sys

    _decode_rank(json.loads(sys.argv[1]))


__all__ = ["SCHEMA", "SUITES", "check_report", "render_markdown", "run_report", "spread", "walk_numbers"]
