"""Inference speed, ours vs transformers `generate`, side by side in one run (issue #4).

    .venv/bin/python benchmarks/bench_infer.py                      # small preset, 1 thread, CPU clock
    .venv/bin/python benchmarks/bench_infer.py --model runs/demo    # + MTP speculative decoding
    .venv/bin/python benchmarks/bench_infer.py --json

Prints tokens/s and the ratios: batch-1 decode vs transformers (several prompt lengths), batch-8
aggregate vs batch 1, cache bytes per token, and, with --model, draft acceptance and the speed-up
of speculative decoding. Same as `longcat bench infer`; the logic lives in longcat.infer.benchmark.
"""

import sys

from longcat.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "infer", *sys.argv[1:]]))
