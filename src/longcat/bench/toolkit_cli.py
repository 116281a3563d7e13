"""The validation toolkit's commands: `longcat bench run|oom|numerics|compare` (docs/VALIDATION.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _check(checks) -> None:
    from ..errors import UserError

    for flag, ok, rule in checks:
        if not ok:
            raise UserError(f"{flag} {rule}")


def run_run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from .report import run_report
    from .subject import resolve_subject

    _check([
        ("--threads", args.threads is None or args.threads >= 1, f"must be >= 1, got {args.threads}"),
        ("--peak-tflops", args.peak_tflops is None or args.peak_tflops > 0, f"must be > 0, got {args.peak_tflops}"),
        ("--clock cpu", args.clock != "cpu" or args.device == "cpu",
         f"counts this process's CPU seconds, not the time {args.device} spends working; use --clock wall"),
        ("--clock cpu", args.clock != "cpu" or args.threads == 1,
         "adds up the CPU seconds of every thread; give --threads 1 with it, or use --clock wall"),
        ("--nproc", args.nproc >= 1, f"must be >= 1, got {args.nproc}"),
        ("--parallel", args.parallel is None or args.nproc > 1,
         "needs --nproc N (N > 1): the layout splits the model over N ranks"),
        ("--clock cpu", args.clock != "cpu" or args.nproc == 1,
         "counts one process's CPU seconds, but N ranks wait on each other; use --clock wall with --nproc"),
        ("--serve", not (args.serve and args.serve_url),
         "and --serve-url both name the server to load; give one (--serve starts ours, --serve-url measures yours)"),
        ("--serve-url", args.serve_url is None or args.serve_url.startswith(("http://", "https://")),
         f"must be an http:// or https:// URL, e.g. http://127.0.0.1:8000, got {args.serve_url!r}"),
    ])
    subject = resolve_subject(args.model)  # a bad model or layout fails now, not after minutes
    device = resolve_device(args.device, setting="--device")
    if args.hardware is not None:
        from ..plan.hardware import load_hardware

        load_hardware(args.hardware)
    if args.serve_url is not None:
        from .serve_load import served_models

        served_models(args.serve_url, timeout_s=10)  # the server answers now, not only after minutes
    if args.nproc > 1:
        from .report import SUITES, plan_ranks

        plan_ranks(subject, SUITES[args.suite], device, args.nproc, args.parallel)
    out = Path(args.out)
    report = run_report(args.model, out, suite=args.suite, device=args.device, threads=args.threads, clock=args.clock,
                        hardware=args.hardware, peak_tflops=args.peak_tflops, nproc=args.nproc,
                        parallel=args.parallel, serve=args.serve, serve_url=args.serve_url,
                        skip=tuple(args.skip), argv=sys.argv[1:], progress=not args.no_progress,
                        log=lambda line: print(line, file=sys.stderr))
    train, served = report["results"]["train"], report["results"]["serve"]
    print(f"wrote {out / 'report.json'} and {out / 'report.md'} ({report['run']['duration_s']:.0f} s)"
          + (f"; train {train['tokens_per_s']:,.0f} tok/s, MFU {train['mfu']:.1%} ({train['layout']})" if train else "")
          + (f"; serve {served['output_tok_per_s']:,.1f} output tok/s" if served else ""))
    return 0


def run_oom(args: argparse.Namespace) -> int:
    from .oom import plot_frontier, run_frontier
    from .subject import resolve_subject

    _check([
        ("--seq-lens", all(n >= 1 for n in args.seq_lens), f"must all be >= 1, got {args.seq_lens}"),
        ("--memory-gib", args.memory_gib > 0, f"must be > 0, got {args.memory_gib}"),
        ("--max-batch", args.max_batch >= 1, f"must be >= 1, got {args.max_batch}"),
        ("--timeout", args.timeout > 0, f"must be > 0 seconds, got {args.timeout}"),
        ("--threads", args.threads >= 1, f"must be >= 1, got {args.threads}"),
    ])
    resolve_subject(args.model)
    if args.device != "cpu":
        from ..devices import resolve_device

        resolve_device(args.device, setting="--device")
    result = run_frontier(args.model, mode=args.mode, seq_lens=tuple(args.seq_lens), memory_gib=args.memory_gib,
                          skews=tuple(args.skew), device=args.device, threads=args.threads, timeout_s=args.timeout,
                          max_batch=args.max_batch, log=lambda line: print(line, file=sys.stderr))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "oom_frontier.json").write_text(json.dumps(result, indent=2))
        why = plot_frontier(result, out / "oom_frontier.png")
        print(f"wrote {out / 'oom_frontier.json'}" + (f" ({why})" if why else f" and {out / 'oom_frontier.png'}"),
              file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    pred = {r["seq_len"]: r["max_batch"] for r in result["predicted"] or []}
    print(f"{result['mode']} OOM frontier of {result['model']} under {args.memory_gib:g} GiB ({result['cap']})")
    print(f"{'skew':14s}{'seq len':>9s}{'largest batch':>15s}{'planner':>9s}  limited by")
    for r in result["measured"]:
        print(f"{r['skew']:14s}{r['seq_len']:9d}{r['max_batch']:15d}{pred.get(r['seq_len'], '-'):>9}  "
              f"{r['limited_by']}")
    print(f"planner: {result['predicted_basis'] or result['predicted_reason']}")
    return 0


def run_numerics_cmd(args: argparse.Namespace) -> int:
    from .numerics import plot_drift, run_numerics
    from .subject import resolve_subject

    _check([
        ("--tokens", args.tokens >= 8, f"must be >= 8, got {args.tokens}"),
        ("--train-steps", args.train_steps >= 1, f"must be >= 1, got {args.train_steps}"),
        ("--seq-len", args.seq_len >= 2, f"must be >= 2, got {args.seq_len}"),
        ("--batch", args.batch >= 1, f"must be >= 1, got {args.batch}"),
    ])
    subject = resolve_subject(args.model)
    result = run_numerics(subject, tokens=args.tokens, train_steps=args.train_steps, train_seq_len=args.seq_len,
                          train_batch=args.batch, log=lambda line: print(line, file=sys.stderr))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "numerics.json").write_text(json.dumps(result, indent=2))
        plot_drift(result, out / "numerics.png")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"against fp32 on {result['held_out']}")
    print(f"{'':6s}{'KL mean':>10s}{'KL p99':>10s}{'top-1':>8s}{'ln PPL ratio':>14s}{'RMS dp':>10s}  drift per layer")
    for name, r in result["inference"].items():
        print(f"{name:6s}{r['kl_mean']:10.2e}{r['kl_p99']:10.2e}{r['top1_agreement']:8.1%}{r['ln_ppl_ratio']:+14.2e}"
              f"{r['rms_delta_p']:10.2e}  " + " ".join(f"{d:.1e}" for d in r["layer_relative_drift"]))
    t = result["training"]
    print(f"training {t['steps']} steps, bf16 autocast vs fp32: loss curves differ by {t['loss_curve_relative_difference']:.2e}"
          f" (relative area); spikes fp32 {[s['step'] for s in t['spikes_fp32']]}, bf16 {[s['step'] for s in t['spikes_bf16']]}")
    if result["note"]:
        print(f"note: {result['note']}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare_reports, load_report, print_comparison

    reports = [load_report(p) for p in args.reports]
    names = [str(Path(p).parent.name if Path(p).name == "report.json" else Path(p).name) or str(p)
             for p in args.reports]
    if len(set(names)) != len(names):
        names = [str(p) for p in args.reports]
    rows = compare_reports(reports, names)
    if args.json:
        print(json.dumps({"reports": names, "rows": rows}, indent=2))
    else:
        print_comparison(reports, names, rows)
    return 0


def register(bench: argparse._SubParsersAction) -> None:
    """Add the validation toolkit's subcommands to `longcat bench`."""
    from .oom import MODES, SKEWS
    from .report import SUITES

    r = bench.add_parser(
        "run", help="the validation report: environment, train, decode, memory, OOM frontier, numerics, telemetry",
        description="Measure a model on this machine and write OUT/report.json (schema longcat.bench.report/1), "
        "OUT/report.md with PNG plots, and OUT/telemetry.jsonl. Every value carries its unit in its key; one that "
        "could not be measured is null with the reason. With --nproc N the train section is `longcat train --nproc N "
        "--parallel LAYOUT` and the decode cells run on N ranks; --serve or --serve-url adds the serve section. "
        "`longcat bench compare` sets two reports side by side (refusing cells of different layouts); "
        "`longcat plan calibrate --from OUT/report.json` makes a planner hardware entry from one. docs/VALIDATION.md.",
    )
    r.add_argument("--model", required=True, metavar="PRESET|DIR",
                   help="a preset (fresh weights from seed 0) or a model/run directory (trained weights; numerics and "
                        "MTP acceptance are meaningful only for these)")
    r.add_argument("--suite", choices=sorted(SUITES), default="quick",
                   help="quick: small workloads, minutes on a laptop CPU; full: the demo's training shape, longer "
                        "prompts, compiled decoding, both routing skews (default quick)")
    r.add_argument("--out", required=True, metavar="DIR", help="folder for report.json, report.md and the plots")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, xpu, npu, ... or auto (default cpu)")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    r.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time (default); cpu: process CPU seconds, steadier on a shared machine with "
                        "--threads 1 (CPU only)")
    r.add_argument("--hardware", default=None, metavar="NAME|FILE",
                   help="planner hardware entry for the prediction and the MFU denominator (default: calibrate this "
                        "CPU into OUT/hardware-calibration.toml; on a GPU the catalog entry that names it)")
    r.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator in TFLOP/s, when you know the device's peak better than a measurement")
    r.add_argument("--nproc", type=int, default=1,
                   help="ranks on this node (torchrun): N > 1 measures the train section with `longcat train --nproc N "
                        "--parallel LAYOUT` (the Trainer) and the decode cells on N ranks each holding its shard "
                        "(as `longcat generate --nproc N`); the layout is recorded and compared (default 1)")
    r.add_argument("--parallel", default=None, metavar="LAYOUT",
                   help="with --nproc: the training layout, e.g. dp_shard=2,ep=2 (default dp_shard=N). Decoding uses "
                        "it when it is an inference layout (tp and ep only), else tp=N,ep=N as `longcat generate`")
    r.add_argument("--serve", action="store_true",
                   help="serve section: start `longcat serve` with this model on 127.0.0.1 (a preset gets its seed-0 "
                        "weights and a tokenizer trained on the embedded corpus), send the suite's seeded load "
                        "through `longcat bench serve`'s generator, then stop it")
    r.add_argument("--serve-url", default=None, metavar="URL",
                   help="serve section: send the same load to a running OpenAI-compatible server instead, e.g. "
                        "http://127.0.0.1:8000 (its model is whatever it serves)")
    r.add_argument("--skip", nargs="+", default=[], choices=["train", "decode", "oom_frontier", "numerics"],
                   help="sections to leave out (recorded as null with the reason)")
    r.add_argument("--no-progress", action="store_true", help="log lines instead of the progress bar")
    r.set_defaults(func=run_run)

    o = bench.add_parser(
        "oom", help="the largest batch per sequence length under a memory cap (each trial in a fresh process)",
        description="For each sequence length, double the batch from 1 until a trial fails, then bisect; every trial "
        "is a fresh child process capped at --memory-gib for the workload (RLIMIT_AS above the runtime's own size on "
        "the CPU, set_per_process_memory_fraction on CUDA/NPU) with a timeout, and ends ok, oom, error or timeout. "
        "The planner's predicted frontier for the same memory is printed next to it.",
    )
    o.add_argument("--model", default="small", metavar="PRESET|DIR", help="preset or model directory (default small)")
    o.add_argument("--mode", choices=MODES, default="train",
                   help="train: two AdamW steps under bf16 autocast; decode: prefill + 4 greedy tokens")
    o.add_argument("--seq-lens", type=int, nargs="+", default=[64, 256, 1024], help="sequence (prompt) lengths")
    o.add_argument("--memory-gib", type=float, default=2.0, help="memory for the workload, GiB (default 2)")
    o.add_argument("--skew", nargs="+", choices=SKEWS, default=["uniform"],
                   help="routing: uniform (as initialised) and/or concentrated (every token to the same top-k experts)")
    o.add_argument("--max-batch", type=int, default=256, help="largest batch tried (default 256)")
    o.add_argument("--timeout", type=float, default=300.0, help="seconds per trial before it counts as timeout")
    o.add_argument("--threads", type=int, default=1, help="torch threads per trial (default 1)")
    o.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, npu, ... (default cpu)")
    o.add_argument("--out", default=None, metavar="DIR", help="write oom_frontier.json and oom_frontier.png here")
    o.add_argument("--json", action="store_true", help="print the result as JSON")
    o.set_defaults(func=run_oom)

    n = bench.add_parser(
        "numerics", help="bf16 and FP8 weights vs fp32: KL, top-1 agreement, PPL ratio, drift; bf16 vs fp32 training",
        description="Score held-out text in fp32, bf16 and with block-quantized FP8 weights (fake-quantized copy): "
        "mean and p99 KL divergence, top-1 agreement, ln(PPL ratio), RMS of the probability difference and the "
        "relative drift of each layer's hidden states. Then train N steps in fp32 and in bf16 autocast from the same "
        "init: the relative area between the loss curves and loss spikes.",
    )
    n.add_argument("--model", required=True, metavar="PRESET|DIR",
                   help="a trained model directory (its tokenizer scores a built-in passage) or a preset")
    n.add_argument("--tokens", type=int, default=512, help="held-out tokens to score (default 512)")
    n.add_argument("--train-steps", type=int, default=20, help="training steps per precision (default 20)")
    n.add_argument("--seq-len", type=int, default=64, help="training sequence length (default 64)")
    n.add_argument("--batch", type=int, default=2, help="training batch (default 2)")
    n.add_argument("--out", default=None, metavar="DIR", help="write numerics.json and numerics.png here")
    n.add_argument("--json", action="store_true", help="print the result as JSON")
    n.set_defaults(func=run_numerics_cmd)

    c = bench.add_parser(
        "compare", help="reports side by side with ratios; refuses cells whose model, workload or precision differ",
        description="Print every cell of the first report (train, decode cells, numerics, OOM frontier) with each "
        "other report's value and its ratio to the first. A cell whose model (config hash), workload, precision or "
        "clock differs is refused, with the fields that differ.",
    )
    c.add_argument("reports", nargs="+", metavar="REPORT", help="report.json files (or the folders holding them)")
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    c.set_defaults(func=run_compare)


__all__ = ["register"]
