"""`longcat bench ...`: benchmarks that print ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import json


def _check(checks: list[tuple[str, bool, str]]) -> None:
    """Every bad argument refused before a benchmark starts (they run for minutes)."""
    from ..errors import UserError

    for flag, ok, rule in checks:
        if not ok:
            raise UserError(f"{flag} {rule}")


def run_model(args: argparse.Namespace) -> int:
    from ..config import parse_overrides
    from .model_bench import run_model_bench

    _check([
        ("--batch", args.batch >= 1, f"must be >= 1, got {args.batch}"),
        ("--seq-len", args.seq_len >= 1, f"must be >= 1, got {args.seq_len}"),
        ("--rounds", args.rounds >= 1, f"must be >= 1, got {args.rounds}"),
        ("--warmup", args.warmup >= 0, f"must be >= 0, got {args.warmup}"),
        ("--threads", args.threads is None or args.threads >= 1, f"must be >= 1, got {args.threads}"),
    ])

    results = run_model_bench(
        args.preset,
        batch=args.batch,
        seq_len=args.seq_len,
        rounds=args.rounds,
        warmup=args.warmup,
        precisions=tuple(args.precision),
        with_reference=not args.no_reference,
        threads=args.threads,
        clock=args.clock,
        overrides=parse_overrides(args.set),
        log=(lambda *_: None) if args.json else print,
    )
    if args.json:
        print(json.dumps([
            {
                "preset": args.preset, "overrides": args.set, "clock": args.clock, "precision": r.precision, "tokens_per_step": r.tokens_per_step,
                "ours_tokens_per_s": r.ours_tokens_per_s, "transformers_tokens_per_s": r.reference_tokens_per_s,
                "speedup": r.speedup,
            }
            for r in results
        ], indent=2))
    return 0


def run_infer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import parse_overrides
    from ..infer.benchmark import run_infer_bench

    _check([
        ("--prompt-lengths", all(n >= 1 for n in args.prompt_lengths), f"must all be >= 1, got {args.prompt_lengths}"),
        ("--new-tokens", args.new_tokens >= 2,
         f"must be >= 2 (decode speed is timed after the first token), got {args.new_tokens}"),
        ("--batch", args.batch >= 1, f"must be >= 1, got {args.batch}"),
        ("--rounds", args.rounds >= 1, f"must be >= 1, got {args.rounds}"),
        ("--threads", args.threads >= 1, f"must be >= 1, got {args.threads}"),
        ("--speculative", all(k >= 1 for k in args.speculative), f"draft counts must be >= 1, got {args.speculative}"),
    ])
    if args.model is None and Path("runs/demo").is_dir():
        args.model = "runs/demo"
    if args.model is not None:  # the speculative section comes last: a bad model fails now, not minutes later
        from ..errors import UserError
        from ..config import load_config
        from ..infer.cli import resolve_model_dir

        model_dir = resolve_model_dir(args.model)
        if load_config(model_dir).mtp_num_layers == 0:
            raise UserError(f"--model {args.model}: {model_dir} has no MTP heads (mtp_num_layers = 0), so there is "
                              "nothing to draft with; give a model trained with MTP (make demo writes one)")
    report = run_infer_bench(
        args.preset, prompt_lengths=tuple(args.prompt_lengths), new_tokens=args.new_tokens, batch=args.batch,
        rounds=args.rounds, threads=args.threads, clock=args.clock, model_dir=args.model,
        speculative=tuple(args.speculative), modes=tuple(args.modes), overrides=parse_overrides(args.set),
        log=(lambda *_: None) if args.json else print,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _register_infer(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "infer",
        help="decode tokens/s vs transformers generate, batch scaling, cache bytes, MTP speculation",
        description="Inference speed, ours vs transformers `generate` on the same weights, side by side in one run: "
        "batch-1 decode at several prompt lengths, batch-8 aggregate vs batch 1, cache bytes per token, and with "
        "--model the MTP draft acceptance and speculative speed-up.",
    )
    p.add_argument("--preset", default="small", help="model preset (n-grams/LSA/MTP off: transformers lacks them)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 512, 2048])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (median reported), after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="process CPU time (robust on a shared machine with 1 thread) or wall time")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a trained model with MTP heads for the speculative-decoding section "
                        "(default: runs/demo when `make demo` has written it)")
    p.add_argument("--speculative", type=int, nargs="+", default=[1, 2, 3], help="draft counts to measure")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                   help="decode paths to measure: FastDecoder (eager) and the torch.compile'd step (compiled)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (no progress lines)")
    p.set_defaults(func=run_infer)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    m = bench.add_parser(
        "model",
        help="forward+backward tokens/s of our model vs transformers' LongcatFlash, same weights",
        description="Train-step throughput (forward + backward) of a preset, ours vs transformers "
        "LongcatFlashForCausalLM on the same weights, interleaved round by round; prints tokens/s and the ratio.",
    )
    m.add_argument("--preset", default="small", help="model preset (n-grams/LSA/MTP are switched off: transformers lacks them)")
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--seq-len", type=int, default=256)
    m.add_argument("--rounds", type=int, default=6, help="measured rounds per precision (median is reported)")
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--precision", nargs="+", default=["fp32", "bf16-autocast"], choices=["fp32", "bf16-autocast"])
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    m.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: process CPU time, robust when other work shares the machine (use with --threads 1)",
    )
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    m.add_argument("--no-reference", action="store_true", help="measure ours only")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_model)
    _register_infer(bench)
