"""`longcat bench run`: one command, one shareable report (docs/VALIDATION.md).

Writes OUT/report.json (schema `longcat.bench.report/1`), OUT/report.md, PNG plots and
OUT/telemetry.jsonl (every telemetry sample). Each section reuses the benchmark that owns the
measurement: `train` is `plan_bench.train_steps` in a child process next to `plan_bench.predict`
(the planner on the same configuration), `decode` runs the inference `Engine` and, for a trained
model with MTP heads, `infer_bench.run_speculative_bench`; `oom_frontier` is bench/oom.py and
`numerics` bench/numerics.py. A value that could not be measured is null, with a `*_reason` (or
`reason`) next to it, never 0.
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


SUITES = {
    "quick": Suite("quick", 128, 4, 1, 3, (1, 4), (32, 128), (16,), 3, ("eager",), (128,), ("uniform",), 1.5, 16,
                   256, 6, True),
    "full": Suite("full", 256, 16, 2, 10, (1, 8), (128, 1024), (64,), 3, ("eager", "compiled"), (64, 256),
                  ("uniform", "concentrated"), 1.5, 32, 1024, 30, False),
}


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the relative spread (max - min) / median of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "repeats": len(values),
            "relative_spread": (max(values) - min(values)) / med if med else None}


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
    tok_s = tokens / statistics.median(step_times)
    model_flops = tok_s * flops_tok
    section: dict[str, Any] = {
        "workload": {"seq_len": suite.train_seq_len, "micro_batch": suite.train_micro_batch, "tokens_per_step": tokens,
                     "data": "random token ids, seed 0", "optimizer": "AdamW (single-tensor)", "grad_accum": 1},
        "precision": "bf16 autocast, fp32 master weights",
        "warmup_steps_excluded": suite.train_warmup,
        "step_time_s": spread(step_times),
        "tokens_per_s": tok_s,
        "model_flops_per_token": flops_tok,
        "model_flops_per_s": model_flops,
        "hardware_flops_per_s": model_flops,
        "hardware_flops_note": "no activation recomputation in this run, so hardware FLOPs equal model FLOPs",
        "mfu": model_flops / peak["peak_flops"],
        "hfu": model_flops / peak["peak_flops"],
        "mfu_denominator_flops_per_s": peak["peak_flops"],
        "mfu_denominator_source": peak["source"],
        "clock": real["clock"], "threads": real["threads"],
        "peak_rss_gib": real["peak_rss_gib"],
        "peak_device_memory_gib": real["peak_device_memory_gib"],
        **({} if real["peak_device_memory_gib"] is not None else
           {"peak_device_memory_reason": "the CPU has no device allocator: peak_rss_gib is the memory"}),
        "runtime_rss_gib": real["baseline_rss_gib"],
        "step_times_s": step_times,
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


def decode_section(subject, suite: Suite, device: torch.device, clock: str, log, tick) -> dict:
    """Prefill and decode latency and throughput per (batch, prompt, output) cell on the Engine."""
    from ..infer import SamplingParams
    from ..model import LatentCache
    from .common import Timer, random_prompts
    from .infer_bench import _engines

    timer = Timer(clock, device)
    model = subject.build(device).float().eval()
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
                            "workload": f"b{batch}-p{prompt_len}-o{new}", "precision": "fp32",
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
        "clock": clock, "threads": torch.get_num_threads(), "warmup_rounds_excluded": 1,
        "method": "prefill = a 1-token generation; decode = a full generation minus that; medians over repeats",
        "prompts": "random token ids, seed = prompt length + batch", "cells": cells,
        "cache_bytes_per_token": cache.nbytes() / (cache.allocated_rows * cache.max_len),
        "cache_bytes_per_token_latent": LatentCache.bytes_per_token(subject.config, dtype_bytes=4),
    }
    if subject.config.mtp_num_layers == 0:
        section["mtp"] = None
        section["mtp_reason"] = "the model has no MTP heads"
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
               serve_url: str | None = None, skip: tuple[str, ...] = (), argv: list[str] | None = None,
               progress: bool = True, log=print) -> dict:
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
    decode_cells = len(chosen.decode_modes) * len(chosen.decode_batches) * len(chosen.decode_prompts) * \
        len(chosen.decode_outputs)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]bench run"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.description}"), TimeElapsedColumn(), disable=not progress, transient=False)
    telemetry = Telemetry(dev, interval_s=0.5, children=True)  # training and OOM trials run in children
    with bar, telemetry:
        task = bar.add_task("environment", total=len(sections) + decode_cells)

        def say(line: str) -> None:
            bar.console.print(line, highlight=False, markup=False) if progress else log(line)

        peak = peak_flops(dev, user_tflops=peak_tflops)
        hw = None
        if "train" in sections:
            bar.update(task, description="train")
            energy_before = energy_now(telemetry)
            results["train"], hw = train_section(subject, chosen, dev, clock, threads, hardware, out, peak, say)
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
            results["decode"] = decode_section(subject, chosen, dev, clock, say, lambda: bar.advance(task))
            window = telemetry.record_fields()
            results["decode"]["process_peak_rss_gib"] = window["rss_gib"]
            results["decode"]["process_peak_device_memory_gib"] = window["device_mem_gib"]
            if window["device_mem_gib"] is None:
                results["decode"]["process_peak_device_memory_reason"] = telemetry.backends()["device_memory"]
            bar.advance(task)
        else:
            reasons["decode"] = "skipped (--skip decode)"
        if serve_url is None:
            reasons["serve"] = ("not asked: start `longcat serve` and give --serve-url URL, or run `longcat bench serve`"
                                " against it")
        else:
            reasons["serve"] = (f"--serve-url {serve_url}: the serve load generator (`longcat bench serve`) is not "
                                "callable from the report yet; run it separately")
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
        "decode_cache_bytes_per_token": results["decode"]["cache_bytes_per_token"] if results["decode"] else None,
        "process_peak_rss_gib": summary["fields"].get("rss_bytes", {}).get("peak", 0) / GiB or None,
        "oom_budget_gib": results["oom_frontier"]["memory_budget_gib"] if results["oom_frontier"] else None,
    }
    for key, value in list(results["memory"].items()):
        if value is None:
            results["memory"][key.removesuffix("_gib") + "_reason"] = "not measured in this run (section skipped, or " \
                "the device has no allocator of its own)"
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
    if not subject.trained:
        notes.append("a preset with fresh weights: speeds are representative, numerics and MTP acceptance are not")
    report = {
        "schema": SCHEMA,
        "run": {"id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)), "suite": chosen.name,
                "command": env["command"], "git_commit": env["git"].get("commit"), "seeds": {"workload": 0, "model": 0},
                "duration_s": time.time() - started},
        "environment": {**env, "device": str(dev), "threads": threads, "clock": clock,
                        "peak_flops_per_s": peak["peak_flops"], "peak_flops_source": peak["source"]},
        "model": subject.describe(),
        "parallelism": {"processes": 1, "layout": "single process", "reason": "--nproc is not supported by bench run yet"},
        "workload": {"generator": "random token ids (torch.Generator, fixed seeds)", "seed": 0,
                     "train": {"seq_len": chosen.train_seq_len, "micro_batch": chosen.train_micro_batch},
                     "decode": {"batches": list(chosen.decode_batches), "prompt_tokens": list(chosen.decode_prompts),
                                "output_tokens": list(chosen.decode_outputs)},
                     "routing_skew": list(chosen.oom_skews), "arrival": None,
                     "arrival_reason": "offline batches only; arrivals belong to `longcat bench serve`"},
        "results": results,
        "reasons": reasons,
        "telemetry": {**summary, "samples_file": "telemetry.jsonl"},
        "validity": {
            "warmup_excluded": {"train_steps": chosen.train_warmup, "decode_rounds": 1},
            "repeats": {"train_steps": chosen.train_steps, "decode": chosen.decode_repeats},
            "train_step_relative_spread": train["step_time_s"]["relative_spread"] if train else None,
            "load_average_before": load_before, "load_average_after": load_after, "usable_cores": cores,
            "machine_shared": shared,
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
            "warm-up.",
            "",
            "| | measured | planner | error |",
            "|---|---:|---:|---:|",
            f"| step time (s) | {_fmt(tr['step_time_s']['median'])} (spread {_fmt(tr['step_time_s']['relative_spread'], 2)}) "
            f"| {_fmt(pred.get('step_time_s'))} | {_pct(pred.get('step_time_error'))} |",
            f"| tokens/s | {_fmt(tr['tokens_per_s'])} | {_fmt(pred.get('tokens_per_s'))} | |",
            f"| MFU | {tr['mfu']:.1%} | {_pct(pred.get('mfu'))} | |",
            f"| peak memory (GiB) | {_fmt(tr['peak_rss_gib'])} RSS | {_fmt(pred.get('memory_gib'))} "
            f"| {_pct(pred.get('memory_error'))} |",
            "",
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
    lines += ["## Serve", "", f"not measured: {report['reasons'].get('serve')}" if not res["serve"] else
              "see report.json", ""]
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


__all__ = ["SCHEMA", "SUITES", "check_report", "render_markdown", "run_report", "spread", "walk_numbers"]
