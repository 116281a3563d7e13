"""Inference speed, ours vs transformers `generate`, side by side in one run (issue #4).

    .venv/bin/python benchmarks/bench_infer.py                      # small preset, 1 thread, CPU clock
    .venv/bin/python benchmarks/bench_infer.py --model runs/demo    # + MTP speculative decoding
    .venv/bin/python benchmarks/bench_infer.py --json

Prints tokens/s and the ratios: batch-1 decode vs transformers (several prompt lengths), batch-8
aggregate vs batch 1, cache bytes per token, and, with --model, draft acceptance and the speed-up
of speculative decoding. The logic lives in longcat.infer.benchmark.
"""

import argparse
import json
import sys

from longcat.config import parse_overrides
from longcat.infer.benchmark import run_infer_bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="model preset (n-grams/LSA/MTP off: transformers lacks them)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 512])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (median reported), after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="process CPU time (robust on a shared machine with 1 thread) or wall time")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a trained model with MTP heads (e.g. runs/demo) for the speculative-decoding section")
    p.add_argument("--speculative", type=int, nargs="+", default=[1, 2, 3], help="draft counts to measure")
    p.add_argument("--json", action="store_true", help="print the results as JSON (no progress lines)")
    args = p.parse_args(argv)
    report = run_infer_bench(
        args.preset, prompt_lengths=tuple(args.prompt_lengths), new_tokens=args.new_tokens, batch=args.batch,
        rounds=args.rounds, threads=args.threads, clock=args.clock, model_dir=args.model,
        speculative=tuple(args.speculative), overrides=parse_overrides(args.set),
        log=(lambda *_: None) if args.json else print,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
