"""Warm-up of the compiled decode step: how long each first generation takes and how many graphs it
compiles, for the sequence `longcat bench infer` runs (batch 1, batch 8, then batch 1 with the cache
grown for 512- and 2048-token prompts).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python benchmarks/bench_compile_warmup.py

An empty inductor cache directory measures compilation from scratch; with the default (warm) cache
the graphs are still traced by torch.compile, but the compiled code is loaded from disk.
"""

from __future__ import annotations

import time

import torch
from torch._dynamo.utils import counters

from longcat.infer import Engine, SamplingParams
from longcat.infer.benchmark import _prompts, comparable_config
from longcat.model import build_model


def main() -> None:
    torch.set_num_threads(1)
    config = comparable_config("small")
    model = build_model(config, seed=0).eval()
    engine = Engine(model, compile=True)
    params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    steps = [("batch 1, 32-token prompt", [32]),
             ("batch 8, 28-35-token prompts", list(range(28, 36))),
             ("batch 1, 512-token prompt (cache grows)", [512]),
             ("batch 1, 2048-token prompt (cache grows)", [2048])]
    total = 0.0
    for name, lengths in steps:
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        engine.generate(_prompts(lengths, config.vocab_size, seed=1), params)
        elapsed = time.perf_counter() - t0
        total += elapsed
        print(f"{name:42s} first generation {elapsed:6.1f} s, graphs compiled: "
              f"{counters['stats']['unique_graphs'] - before}", flush=True)
    print(f"{'all four':42s} {total:6.1f} s, graphs compiled: {counters['stats']['unique_graphs']}")


if __name__ == "__main__":
    main()
