"""How far batching can go when a decode step is bound by reading its weights (issue #4's batch-8 target).

    .venv/bin/python benchmarks/decode_weight_reads.py                  # `small`, batch 8 vs batch 1
    .venv/bin/python benchmarks/decode_weight_reads.py --set hidden_size=512 --set ffn_hidden_size=1024

A batch-1 step reads the dense weights and the ~8 FFN experts its token was routed to in each MoE
layer; a batch-8 step reads the same dense weights and the union of its 8 tokens' experts, about six
times as many with 128 experts. This script routes the benchmark's batch-8 and batch-1 generations
(`longcat bench infer`'s prompts, greedy, through the model's own router), collects the weight ranges
each decode step reads, and times a loop that does nothing but read exactly those bytes, step after
step, on one core. It prints the bytes per step and
    ceiling = 8 x (read time per batch-1 step) / (read time per batch-8 step),
the batch-8 aggregate speed-up over batch 1 of a step that did nothing but read its weights. A real
step also computes; one whose batch-1 step is close to its read time cannot beat this ratio.

The reader is a small C++ loop (built with torch.utils.cpp_extension.load_inline: needs g++ and ninja).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

from longcat.config import ConfigError, parse_overrides
from longcat.infer import Engine, SamplingParams
from longcat.infer import compiled as C
from longcat.infer import decode as D
from longcat.infer.benchmark import _prompts, comparable_config
from longcat.model import build_model

READER = r"""
#include <torch/extension.h>
#include <immintrin.h>
// The sum of flat[a:b] over the (R, 2) ranges: streams exactly those floats, four accumulators.
double read_ranges(torch::Tensor flat, torch::Tensor ranges) {
  const float* p = flat.data_ptr<float>();
  const int64_t* r = ranges.data_ptr<int64_t>();
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  float tail = 0;
  for (int64_t i = 0; i < ranges.size(0); ++i) {
    int64_t a = r[2 * i], b = r[2 * i + 1];
    for (; a < b && (a & 7); ++a) tail += p[a];
    for (; a + 32 <= b; a += 32) {
      a0 = _mm256_add_ps(a0, _mm256_load_ps(p + a)); a1 = _mm256_add_ps(a1, _mm256_load_ps(p + a + 8));
      a2 = _mm256_add_ps(a2, _mm256_load_ps(p + a + 16)); a3 = _mm256_add_ps(a3, _mm256_load_ps(p + a + 24));
    }
    for (; a < b; ++a) tail += p[a];
  }
  alignas(32) float s[8];
  _mm256_store_ps(s, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7] + tail;
}
"""


def routed_experts(engine: Engine, prompts, new_tokens: int) -> list[list[list[int]]]:
    """Per decode step, per MoE layer, the FFN experts the step's tokens were routed to."""
    calls: list[list[int]] = []
    moe_step = D.FastDecoder.moe

    def recording(self, moe, x):
        indices = moe.router(x.reshape(-1, x.shape[-1])).indices  # the model's own routing
        calls.append(sorted({e for e in indices.flatten().tolist() if e < moe.num_experts}))
        return moe_step(self, moe, x)

    D.FastDecoder.moe = recording
    try:
        engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    finally:
        D.FastDecoder.moe = moe_step
    layers = engine.model.config.num_layers
    decode = calls[layers:]  # the first `layers` calls are the prefill
    return [decode[i : i + layers] for i in range(0, len(decode) - layers + 1, layers)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the `small` preset, as `longcat bench infer`")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="passes over all steps; the median is printed")
    args = p.parse_args()
    if args.batch < 2 or args.new_tokens < 2 or args.rounds < 1:
        p.error("--batch and --new-tokens must be at least 2, --rounds at least 1")
    try:
        config = comparable_config("small", **parse_overrides(args.overrides))
    except ConfigError as error:
        p.error(str(error))
    torch.set_num_threads(1)
    reader = load_inline("longcat_read_ranges", cpp_sources=READER, functions=["read_ranges"],
                         extra_cflags=["-O3", "-march=native"])
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # as `longcat bench infer`
    engine = Engine(model)  # FastDecoder: its MoE step is where the routing is recorded
    lengths = [max(1, 32 + d) for d in range(-(args.batch // 2), args.batch - args.batch // 2)]
    prompts = _prompts(lengths, config.vocab_size, seed=99)  # the benchmark's batch prompts
    steps = {1: routed_experts(engine, prompts[:1], args.new_tokens),
             args.batch: routed_experts(engine, prompts, args.new_tokens)}

    packed = C.PackedWeights(model)  # the compiled step's flat buffer: what it reads, where
    assert len(packed.flats) == 1, "one dtype expected"
    read = [n for n in packed.where if not n.startswith(C.NOT_IN_DECODE_GRAPH)]
    dense = sorted((packed.where[n][1], packed.where[n][1] + packed.where[n][2]) for n in read if ".experts." not in n)
    experts = [[packed.where[f"layers.{i}.mlp.experts.{w}"] for w in ("gate_up_proj", "down_proj")]
               for i in range(config.num_layers)]
    per_expert = [[w[2] // config.n_routed_experts for w in layer] for layer in experts]

    def ranges(step) -> torch.Tensor:
        out = [list(r) for r in dense]
        for (gate_up, down), sizes, chosen in zip(experts, per_expert, step):
            for (_, offset, _, _), size in zip((gate_up, down), sizes):
                out += [[offset + e * size, offset + (e + 1) * size] for e in chosen]
        return torch.tensor(out, dtype=torch.int64)

    flat = packed.flats[0]
    work = {b: [ranges(s) for s in ss] for b, ss in steps.items()}
    mb = {b: statistics.mean(int((r[:, 1] - r[:, 0]).sum()) for r in rs) * 4 / 1e6 for b, rs in work.items()}
    times: dict[int, list[float]] = {b: [] for b in work}
    for _ in range(args.rounds + 1):  # the first pass warms up
        for b, rs in work.items():
            t0 = time.perf_counter()
            for r in rs:
                reader.read_ranges(flat, r)
            times[b].append((time.perf_counter() - t0) / len(rs))
    t = {b: statistics.median(v[1:]) for b, v in times.items()}
    print(f"`small`{''.join(f', {o}' for o in args.overrides)}: {config.n_routed_experts} experts, one core")
    for b in work:
        distinct = statistics.mean(len(layer) for s in steps[b] for layer in s)
        print(f"batch {b}: {distinct:5.1f} FFN experts per MoE layer per step, {mb[b]:6.1f} MB read per step, "
              f"{t[b] * 1e3:6.3f} ms ({mb[b] / t[b] / 1e3:5.1f} GB/s)")
    B = args.batch
    print(f"bytes: batch {B} reads {mb[B] / mb[1]:.2f}x batch 1's; weights-only ceiling of the batch-{B} "
          f"aggregate vs batch 1: {B * mb[1] / mb[B]:.2f}x by bytes, {B * t[1] / t[B]:.2f}x by measured read time")


if __name__ == "__main__":
    main()
