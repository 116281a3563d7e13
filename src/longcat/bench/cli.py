"""`longcat bench ...`: benchmarks that print ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import json


def run_model(args: argparse.Namespace) -> int:
    from ..config import parse_overrides
    from .model_bench import run_model_bench

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
