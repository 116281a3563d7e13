"""`longcat bench memory`: each rank's peak memory when a model is built sharded over 1, 2 and 4
ranks, for one training step and for one greedy generation.

Every (rank count, phase) is its own torchrun launch (`longcat.parallel.launch`), so each peak is
the whole life of fresh processes: import, process group, sharded construction (the model is
built on the meta device and each rank allocates only its shard, `parallelize`), optionally a
distributed checkpoint loaded into the shards, then

- train: one forward and backward of a global batch through the `ParallelModel`, the gradient
  norm, and one AdamW step (bf16 parameters, gradients and moments: 8 bytes a parameter);
- infer: a greedy continuation of a prompt, one full forward of the sharded model per new token
  (FSDP gathers each layer's shards for its forward, experts stay on their expert-parallel rank).
  Distributed decoding over a KV cache is not part of `longcat.parallel` yet.

The peak is each rank process's own peak resident set (`VmHWM` on Linux, `ru_maxrss` elsewhere:
`longcat.telemetry.peak_rss`; the rows say which in `peak_source`), which includes the Python and torch
runtime (`baseline_gib`: the peak before the model is built). The default model has the `flash`
preset's structure (MLA shapes, top-12 routing over N FFN and N/2 zero experts, expert width 2048)
at hidden 2048 with 2 layers of 40 experts and a 16K vocabulary: 2.3 GB of BF16 weights, of which
the experts are 87%.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

GiB = 2**30
PHASES = ("train", "infer")
TARGET_SHARE = 0.40  # the target: a rank of 4 at most 40% of one process's peak
# flash's structure at a size whose one-process training step fits a 24 GiB machine
BENCH_OVERRIDES = {
    "hidden_size": 2048, "num_attention_heads": 16, "ffn_hidden_size": 1024, "num_layers": 2,
    "n_routed_experts": 40, "zero_expert_num": 20, "vocab_size": 16384, "mtp_num_layers": 0,
    "max_position_embeddings": 4096,
}


def bench_config(preset_name: str, overrides: dict):
    from ..config import preset

    base = dict(BENCH_OVERRIDES) if preset_name == "flash" else {}
    return preset(preset_name, **{**base, **overrides})


def layout_for(ranks: int, kind: str) -> str:
    """The layout of `ranks` ranks: "ep" shards experts over every rank (and FSDP the rest), "fsdp"
    shards everything with FSDP alone."""
    if ranks == 1:
        return ""
    return f"dp_shard={ranks},ep={ranks}" if kind == "ep" else f"dp_shard={ranks}"


def _peak_gib() -> float:
    from ..telemetry import peak_rss

    return peak_rss()[0] / GiB


# ------------------------------------------------------------------------------------------------
# one launch: every rank runs this


def run_worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ..config import from_dict
    from ..model import build_model
    from ..model.losses import LossWeights
    from ..parallel.engine import parallelize, setup
    from ..parallel.layout import ParallelLayout, shutdown_distributed

    torch.set_num_threads(spec.get("threads", 1))
    config = from_dict(spec["config"], source="bench memory")
    batch, seq_len = spec["batch"], spec["seq_len"]
    dims = setup(ParallelLayout.parse(spec["layout"]), config, device="cpu", seq_len=seq_len, global_batch=batch)
    baseline = _peak_gib()
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    pm = parallelize(model, dims, seq_len=seq_len, precision="fp32", seed=spec["seed"])  # no cast: bf16 as built
    if spec.get("checkpoint"):
        from ..parallel.checkpoint import load_checkpoint

        load_checkpoint(spec["checkpoint"], pm.module, None)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
               for p in pm.module.parameters())
    built = _peak_gib()
    gen = torch.Generator().manual_seed(spec["seed"])
    tokens: list[int] = []
    loss = None
    if spec["phase"] == "train":
        pm.train()
        optimizer = torch.optim.AdamW(pm.module.parameters(), lr=1e-4, foreach=False)
        ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen)
        result = pm.forward_backward(ids[:, :-1], ids[:, 1:], LossWeights())
        pm.clip_grad_norm_(1.0)
        optimizer.step()
        loss = result.losses["loss_total"]
    else:
        from torch.distributed.fsdp import FSDPModule

        pm.train(False)
        # units that keep their gathered weights after forward for the backward (root, output head)
        units = [m for m in pm.module.modules() if isinstance(m, FSDPModule)]
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
        with torch.no_grad():
            for _ in range(spec["new_tokens"]):
                # every rank runs the same (global) batch: FSDP ranks each gather the layers
                logits = pm.module(ids, mtp=False, indexer_loss=False, logits_to_keep=1).logits  # (B, 1, V)
                for unit in units:
                    unit.reshard()  # no backward follows
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        tokens = ids[0, seq_len:].tolist()
    from ..telemetry import peak_rss

    peak, source = peak_rss()
    mine = {"peak_gib": peak / GiB, "peak_source": source, "baseline_gib": baseline, "built_gib": built,
            "held_gib": held / GiB}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps({"ranks": everyone, "loss": loss, "tokens": tokens}))
    shutdown_distributed()


# ------------------------------------------------------------------------------------------------
# the driver


def measure(config, *, ranks: list[int], phases: list[str], kind: str = "ep", batch: int = 4, seq_len: int = 64,
            new_tokens: int = 4, seed: int = 0, threads: int = 1, checkpoint: str | None = None,
            timeout: float = 3600.0, log=lambda line: None) -> list[dict]:
    """One launch per (rank count, phase); rows with each rank's peak against one process's."""
    from ..errors import UserError
    from ..model.count import count_parameters
    from ..parallel.launch import launch
    from ..parallel.layout import ParallelLayout

    full_bytes = count_parameters(config).total * 2  # BF16
    for n in ranks:  # every layout is checked before any process starts
        ParallelLayout.parse(layout_for(n, kind)).validate(config, n, seq_len=seq_len, global_batch=batch)
    results: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="longcat-bench-memory-") as tmp:
        for phase in phases:
            for n in ranks:
                out = Path(tmp) / f"{phase}_{n}.json"
                spec = {"config": config.to_dict(), "layout": layout_for(n, kind), "phase": phase, "batch": batch,
                        "seq_len": seq_len, "new_tokens": new_tokens, "seed": seed, "threads": threads,
                        "checkpoint": checkpoint, "out": str(out)}
                log(f"{phase}: {n} rank(s), layout {layout_for(n, kind) or 'one process'}")
                proc = launch(["-m", "longcat.bench.memory_bench", json.dumps(spec)], nproc=n,
                              threads_per_rank=threads, timeout=timeout, capture=True)
                if proc.returncode != 0 or not out.exists():
                    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
                    raise UserError(f"bench memory: the {n}-rank {phase} launch failed (exit {proc.returncode}):\n{tail}")
                results[(n, phase)] = json.loads(out.read_text())
    rows = []
    for phase in phases:
        single = results.get((1, phase))
        single_peak = single["ranks"][0]["peak_gib"] if single else None
        for n in ranks:
            r = results[(n, phase)]
            peaks = [x["peak_gib"] for x in r["ranks"]]
            row = {
                "ranks": n, "phase": phase, "layout": layout_for(n, kind) or "one process",
                "max_rank_peak_gib": round(max(peaks), 3),
                "single_process_peak_gib": None if single_peak is None else round(single_peak, 3),
                "share_of_single": None if single_peak is None else round(max(peaks) / single_peak, 3),
                "rank_peaks_gib": [round(p, 3) for p in peaks],
                "baseline_gib": round(max(x["baseline_gib"] for x in r["ranks"]), 3),
                "max_rank_weights_gib": round(max(x["held_gib"] for x in r["ranks"]), 3),
                "model_bf16_gib": round(full_bytes / GiB, 3),
                "peak_source": r["ranks"][0]["peak_source"],
            }
            if phase == "train":
                row["loss"] = r["loss"]
            else:
                row["tokens"] = r["tokens"]
                if single is not None:
                    row["same_tokens_as_one_process"] = r["tokens"] == single["tokens"]
            if n == 4 and single_peak is not None:
                row["target_met"] = max(peaks) <= TARGET_SHARE * single_peak
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'phase':<6} {'ranks':>5}  {'layout':<18} {'max rank peak':>13} {'one process':>11} {'share':>6} "
             f"{'weights/rank':>12} {'model bf16':>10}"]
    for r in rows:
        share = "-" if r["share_of_single"] is None else f"{100 * r['share_of_single']:.0f}%"
        single = "-" if r["single_process_peak_gib"] is None else f"{r['single_process_peak_gib']:.2f} GiB"
        lines.append(f"{r['phase']:<6} {r['ranks']:>5}  {r['layout']:<18} {r['max_rank_peak_gib']:>9.2f} GiB "
                     f"{single:>11} {share:>6} {r['max_rank_weights_gib']:>8.2f} GiB {r['model_bf16_gib']:>6.2f} GiB")
    sources = sorted({r["peak_source"] for r in rows})
    lines.append(f"peak: each rank process's own high-water mark ({', '.join(sources)})")
    return "\n".join(lines)


def _run_cli(args) -> int:
    from ..config import parse_overrides
    from ..errors import UserError

    if any(n < 1 for n in args.ranks):
        raise UserError(f"--ranks must be >= 1, got {args.ranks}")
    config = bench_config(args.preset, parse_overrides(args.set))
    rows = measure(config, ranks=sorted(set(args.ranks)), phases=args.phases, kind=args.layout, batch=args.batch,
                   seq_len=args.seq_len, new_tokens=args.new_tokens, threads=args.threads,
                   checkpoint=args.checkpoint, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def register(bench) -> None:
    p = bench.add_parser(
        "memory",
        help="each rank's peak memory for a train step and a generation on 1, 2 and 4 ranks",
        description="Builds a model sharded over 1, 2 and 4 ranks (meta-device construction: each rank allocates "
        "only its shard), runs one training step (AdamW, bf16 parameters and state) and one greedy generation, "
        "each in fresh processes, and prints every rank's peak resident memory against one process's peak and "
        "the full model's BF16 bytes. The default model is flash-shaped (2.3 GB of BF16 weights); the target is "
        "a rank of 4 at most 40%% of one process's peak.",
    )
    p.add_argument("--preset", default="flash",
                   help="model preset (default flash, scaled down to 2.3 GB of BF16 weights; other presets as they are)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts to measure (default 1 2 4)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="what to run (default both)")
    p.add_argument("--layout", choices=["ep", "fsdp"], default="ep",
                   help="ep: dp_shard=N,ep=N (experts split over the ranks, the rest FSDP-sharded); fsdp: dp_shard=N")
    p.add_argument("--batch", type=int, default=4, help="global batch in sequences (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence and prompt (default 64)")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens generated in the infer phase (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a distributed (multi-process) checkpoint step directory of this model to load into the shards")
    p.add_argument("--json", action="store_true",
                   help="print a list of rows (ranks, phase, max_rank_peak_gib, single_process_peak_gib, ...)")
    p.set_defaults(func=_run_cli)


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
