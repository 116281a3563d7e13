"""`longcat bench memory`: each rank's peak memory when a model is loaded sharded over 1, 2 and 4
ranks, for one training step and for one greedy generation.

The model is first written to a temporary model directory (`--checkpoint DIR`: any checkpoint
`longcat.load` reads instead). Every (rank count, phase) is then its own torchrun launch
(`longcat.parallel.launch`), so each peak is the whole life of fresh processes:

- train: import, process group, the model built on the meta device and laid out
  (`dp_shard=N,ep=N`, or `dp_shard=N` with `--layout fsdp`), each rank reading only its shards from
  the checkpoint (`parallelize(load_from=...)`), then one forward and backward of a global batch
  through the `ParallelModel`, the gradient norm and one AdamW step (bf16 parameters, gradients
  and moments);
- infer: what `longcat generate` runs. One process loads the whole model (`longcat.load`); N
  ranks take `longcat generate --nproc N`'s path (layout tp=N,ep=N: each rank builds on meta,
  keeps its shard and reads only that, `parallel.inference.load_for_inference`); then the same
  `Engine` generates a greedy continuation of a batch of prompts over the latent cache.

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


def write_checkpoint(spec: dict) -> None:
    """The model both phases load: `config` initialised with `seed` in BF16, saved as our model
    directory (built on meta and initialised tensor by tensor in BF16: no FP32 copy is made)."""
    import torch

    from ..config import from_dict
    from ..interop.native import save_model
    from ..model import build_model
    from ..parallel.sharded_init import materialize_shards

    torch.set_num_threads(spec.get("threads", 1))
    config = from_dict(spec["config"], source="bench memory")
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    materialize_shards([model], torch.device("cpu"), spec["seed"], config)
    save_model(model, spec["out"])


def _rank_row(baseline: float, built: float, held_bytes: int) -> dict:
    from ..telemetry import peak_rss

    peak, source = peak_rss()
    return {"peak_gib": peak / GiB, "peak_source": source, "baseline_gib": baseline, "built_gib": built,
            "held_gib": held_bytes / GiB}


def _train(spec: dict) -> dict:
    """One step of the `ParallelModel`, built on meta and filled from the checkpoint
    (`parallelize(load_from=...)`: each rank reads only its shards)."""
    import torch
    from torch.distributed.tensor import DTensor

    from ..model import build_model
    from ..model.losses import LossWeights
    from ..parallel.engine import parallelize, setup
    from ..parallel.layout import ParallelLayout
    from ..parallel.sharded_load import load_config

    config = load_config(spec["checkpoint"])
    batch, seq_len = spec["batch"], spec["seq_len"]
    dims = setup(ParallelLayout.parse(spec["layout"]), config, device="cpu", seq_len=seq_len, global_batch=batch)
    baseline = _peak_gib()
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    # precision fp32 is FSDP's "no cast" policy: the bf16 parameters compute as they are
    pm = parallelize(model, dims, seq_len=seq_len, precision="fp32", load_from=spec["checkpoint"])
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
               for p in pm.module.parameters())
    built = _peak_gib()
    pm.train()
    optimizer = torch.optim.AdamW(pm.module.parameters(), lr=1e-4, foreach=False)
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen)
    result = pm.forward_backward(ids[:, :-1], ids[:, 1:], LossWeights())
    pm.clip_grad_norm_(1.0)
    optimizer.step()
    return {**_rank_row(baseline, built, held), "loss": result.losses["loss_total"]}


def _infer(spec: dict) -> dict:
    """A greedy generation through the `Engine`, as `longcat generate` runs it: one process loads
    the whole model (`longcat.load`); N ranks run `longcat generate --nproc N`'s path (layout
    tp=N,ep=N: each rank builds on meta, keeps its shard and reads only that from the checkpoint,
    `parallel.inference.load_for_inference`)."""
    import torch

    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams
    from ..parallel.inference import local_bytes

    world = int(spec["ranks"])
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    if world == 1:
        from .. import load

        baseline = _peak_gib()
        model = load(spec["checkpoint"], dtype=dtype, progress=False)
    else:
        from ..parallel.inference import load_for_inference, setup_inference
        from ..parallel.sharded_load import load_config

        ranks = setup_inference(spec["layout"], load_config(spec["checkpoint"]), device_type="cpu")
        baseline = _peak_gib()
        model = load_for_inference(spec["checkpoint"], ranks, dtype=dtype)
    built = _peak_gib()
    held = local_bytes(model)
    gen = torch.Generator().manual_seed(spec["seed"])
    prompts = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq_len"]), generator=gen).tolist()
    engine = Engine(model)  # as `longcat generate`: the cache is sized for what the batch needs
    params = SamplingParams(max_new_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True)
    tokens = [r.token_ids for r in engine.generate(prompts, params)]
    return {**_rank_row(baseline, built, held), "tokens": tokens}


def run_worker(spec: dict) -> None:
    import os

    import torch

    torch.set_num_threads(spec.get("threads", 1))
    rank = int(os.environ.get("RANK", "0"))
    mine = (_train if spec["phase"] == "train" else _infer)(spec)
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(mine))
    import torch.distributed as dist

    if dist.is_initialized():
        from ..parallel.layout import shutdown_distributed

        shutdown_distributed()


# ------------------------------------------------------------------------------------------------
# the driver


def infer_layout(ranks: int) -> str:
    """`longcat generate --nproc N`'s default layout: attention and dense FFNs tensor-parallel,
    experts expert-parallel over all N ranks."""
    return f"tp={ranks},ep={ranks}" if ranks > 1 else ""


def _layout(phase: str, ranks: int, kind: str) -> str:
    return layout_for(ranks, kind) if phase == "train" else infer_layout(ranks)


def _launch(module_args: list[str], nproc: int, threads: int, timeout: float, what: str):
    from ..errors import UserError
    from ..parallel.launch import launch

    proc = launch(module_args, nproc=nproc, threads_per_rank=threads, timeout=timeout, capture=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise UserError(f"bench memory: {what} failed (exit {proc.returncode}):\n{tail}")


def measure(config, *, ranks: list[int], phases: list[str], kind: str = "ep", batch: int = 4, seq_len: int = 64,
            new_tokens: int = 4, seed: int = 0, threads: int = 1, checkpoint: str | None = None,
            infer_dtype: str | None = None, timeout: float = 3600.0, log=lambda line: None) -> list[dict]:
    """One launch per (rank count, phase); rows with each rank's peak against one process's.
    Both phases load `checkpoint` (any checkpoint `longcat.load` reads; default: `config`
    initialised with `seed`, written to a temporary model directory first); `infer_dtype` is the
    generation's weights and cache dtype ("float32", ...; None: as stored)."""
    from ..errors import UserError
    from ..model.count import count_parameters
    from ..parallel.layout import ParallelLayout

    if checkpoint is not None:
        from ..parallel.sharded_load import load_config

        config = load_config(checkpoint)
    full_bytes = count_parameters(config).total * 2  # BF16
    for n in ranks:  # every layout is checked before any process starts
        if "train" in phases:
            ParallelLayout.parse(layout_for(n, kind)).validate(config, n, seq_len=seq_len, global_batch=batch)
        if "infer" in phases and n > 1:
            ParallelLayout.parse(infer_layout(n)).validate_inference(config, n)
    results: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="longcat-bench-memory-") as tmp:
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "model")
            log(f"writing the model ({full_bytes / GiB:.2f} GiB in BF16) to {checkpoint}")
            spec = {"write": True, "config": config.to_dict(), "seed": seed, "threads": threads, "out": checkpoint}
            _launch(["-m", "longcat.bench.memory_bench", json.dumps(spec)], 1, threads, timeout, "writing the model")
        for phase in phases:
            for n in ranks:
                out = Path(tmp) / f"{phase}_{n}"
                layout = _layout(phase, n, kind)
                spec = {"layout": layout, "ranks": n, "phase": phase, "batch": batch, "seq_len": seq_len,
                        "new_tokens": new_tokens, "seed": seed, "threads": threads, "checkpoint": checkpoint,
                        "dtype": infer_dtype, "out": str(out)}
                log(f"{phase}: {n} rank(s), layout {layout or 'one process'}")
                _launch(["-m", "longcat.bench.memory_bench", json.dumps(spec)], n, threads, timeout,
                        f"the {n}-rank {phase} launch")
                files = [out.with_suffix(f".rank{r}.json") for r in range(n)]
                if not all(f.exists() for f in files):
                    raise UserError(f"bench memory: the {n}-rank {phase} launch wrote no result for every rank")
                results[(n, phase)] = [json.loads(f.read_text()) for f in files]
    rows = []
    for phase in phases:
        single = results.get((1, phase))
        single_peak = single[0]["peak_gib"] if single else None
        for n in ranks:
            r = results[(n, phase)]
            peaks = [x["peak_gib"] for x in r]
            row = {
                "ranks": n, "phase": phase, "layout": _layout(phase, n, kind) or "one process",
                "max_rank_peak_gib": round(max(peaks), 3),
                "single_process_peak_gib": None if single_peak is None else round(single_peak, 3),
                "share_of_single": None if single_peak is None else round(max(peaks) / single_peak, 3),
                "rank_peaks_gib": [round(p, 3) for p in peaks],
                "baseline_gib": round(max(x["baseline_gib"] for x in r), 3),
                "max_rank_built_gib": round(max(x["built_gib"] for x in r), 3),
                "max_rank_weights_gib": round(max(x["held_gib"] for x in r), 6),
                "model_bf16_gib": round(full_bytes / GiB, 6),
                "peak_source": r[0]["peak_source"],
            }
            if phase == "train":
                row["loss"] = r[0]["loss"]
            else:
                row["tokens"] = r[0]["tokens"]
                row["same_tokens_on_every_rank"] = all(x["tokens"] == r[0]["tokens"] for x in r)
                if single is not None:
                    row["same_tokens_as_one_process"] = r[0]["tokens"] == single[0]["tokens"]
            if n == 4 and single_peak is not None:
                row["target_met"] = max(peaks) <= TARGET_SHARE * single_peak
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'phase':<6} {'ranks':>5}  {'layout':<18} {'max rank peak':>13} {'one process':>11} {'share':>6} "
             f"{'weights/rank':>12} {'model bf16':>10}  greedy tokens"]
    for r in rows:
        share = "-" if r["share_of_single"] is None else f"{100 * r['share_of_single']:.0f}%"
        single = "-" if r["single_process_peak_gib"] is None else f"{r['single_process_peak_gib']:.2f} GiB"
        same = {True: "= one process", False: "DIFFER from one process", None: "-"}[
            r.get("same_tokens_as_one_process") if r["ranks"] > 1 else None]
        lines.append(f"{r['phase']:<6} {r['ranks']:>5}  {r['layout']:<18} {r['max_rank_peak_gib']:>9.2f} GiB "
                     f"{single:>11} {share:>6} {r['max_rank_weights_gib']:>8.2f} GiB {r['model_bf16_gib']:>6.2f} GiB  "
                     f"{same if r['phase'] == 'infer' else ''}".rstrip())
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
                   checkpoint=args.checkpoint, infer_dtype=args.dtype,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def register(bench) -> None:
    p = bench.add_parser(
        "memory",
        help="each rank's peak memory for a train step and a generation on 1, 2 and 4 ranks",
        description="Loads a model sharded over 1, 2 and 4 ranks (built on the meta device: each rank allocates and "
        "reads only its shard), runs one training step (AdamW, bf16 parameters and state) and one greedy generation "
        "(the path of `longcat generate --nproc N`), each in fresh processes, and prints every rank's peak resident "
        "memory against one process's peak and the full model's BF16 bytes. The default model is flash-shaped "
        "(2.3 GB of BF16 weights); the target is a rank of 4 at most 40%% of one process's peak.",
    )
    p.add_argument("--preset", default="flash",
                   help="model preset (default flash, scaled down to 2.3 GB of BF16 weights; other presets as they "
                   "are)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts to measure (default 1 2 4)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="what to run (default both)")
    p.add_argument("--layout", choices=["ep", "fsdp"], default="ep",
                   help="the train layout. ep: dp_shard=N,ep=N (experts split over the ranks, the rest FSDP-sharded); "
                   "fsdp: dp_shard=N. Generation always runs tp=N,ep=N, the default of `longcat generate --nproc N`")
    p.add_argument("--batch", type=int, default=4,
                   help="global batch in sequences: the train step's batch and the number of prompts generated "
                   "(default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence and prompt (default 64)")
    p.add_argument("--new-tokens", type=int, default=4,
                   help="tokens generated for each of the --batch prompts in the infer phase (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="the model to load (any checkpoint `longcat.load` reads; --preset and --set are then unused); "
                   "default: the preset model, initialised and written to a temporary directory first")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the generation's weights and cache dtype (default: as stored). bf16 ranks round their "
                   "partial sums differently from one process, so a near-tie between two logits can pick another "
                   "greedy token; float32 makes the tokens comparable")
    p.add_argument("--json", action="store_true",
                   help="print a list of rows (ranks, phase, max_rank_peak_gib, single_process_peak_gib, ...)")
    p.set_defaults(func=_run_cli)


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    write_checkpoint(_spec) if _spec.get("write") else run_worker(_spec)
