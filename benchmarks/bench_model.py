"""Train-step throughput of the `small` preset: ours vs transformers, side by side (issue: Model core).

    .venv/bin/python benchmarks/bench_model.py            # same as `longcat bench model`
"""

import sys

from longcat.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "model", *sys.argv[1:]]))
