"""`longcat info`: parameter counts, active parameters, KV-cache and weight memory of a model; for
a published checkpoint directory also what it is (family, dtypes, FP8 block grid) and its bytes per
component on disk and in memory for each `weights_dtype`."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from .config import PRESETS, ConfigError, ModelConfig, load_config, preset
from .model.count import count_parameters, kv_cache_bytes_per_token


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a TOML/JSON config file, or a model directory holding config.json."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.exists():
        return load_config(path)
    raise ConfigError(f"'{spec}' is neither a preset ({', '.join(PRESETS)}) nor an existing file or directory")


def model_info(config: ModelConfig) -> dict:
    counts = count_parameters(config)
    by = counts.by_component
    total = counts.total - by["mtp"]  # published totals exclude the MTP heads
    kv = kv_cache_bytes_per_token(config, dtype_bytes=2)
    return {
        "total_params": total,
        "total_params_with_mtp": counts.total,
        "active_params": round(counts.active_params),
        "ffn_slots_per_token": counts.ffn_slots_per_token,
        "params_by_component": by,
        "kv_cache_bytes_per_token": {"latent_bf16": kv["latent"], "expanded_bf16": kv["expanded"]},
        "weight_bytes": {"bf16": 2 * counts.total, "fp8": counts.total},
        "config": config.to_dict(),
    }


def component_of(name: str) -> str:
    """Which count_parameters component one of our parameter names belongs to."""
    parts = name.split(".")
    if parts[0] in ("embed_tokens", "lm_head"):
        return "embedding"
    if parts[0] in ("ngram", "mtp", "norm"):
        return parts[0]
    kind = parts[2] if len(parts) > 2 else ""
    if kind == "self_attn":
        return "attention"
    if kind == "mlps":
        return "dense_ffn"
    if kind == "mlp":
        return "router" if parts[3] == "router" else "experts"
    return "norm"


def fp8_scale_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The fp32 block-scale tensor of an FP8-resident weight of `shape` (a stacked gate/up
    projection has one grid per half)."""
    from .model.fp8 import BLOCK

    *lead, rows, cols = shape
    parts = 2 if name.endswith("gate_up_proj") else 1
    return (*lead, parts * math.ceil(rows / parts / BLOCK), math.ceil(cols / BLOCK))


def resident_bytes(name: str, shape: tuple[int, ...], weights_dtype: str, fp8_resident: bool, stored=None) -> int:
    """Bytes `longcat.load(..., weights_dtype=...)` allocates for parameter `name` of `shape`:
    FP8-resident weights as e4m3 plus their fp32 block scales (weights_dtype "fp8"), the router in
    fp32, everything else in the weights dtype ("fp8": as `stored`, FP8 upcast to bf16; bf16 when
    the checkpoint does not say)."""
    import torch

    from .interop.materialize import WEIGHTS_DTYPES
    from .model.fp8 import is_fp8

    numel = math.prod(shape)
    if fp8_resident and weights_dtype == "fp8":
        return numel + 4 * math.prod(fp8_scale_shape(name, shape))
    if ".router." in name:
        return 4 * numel  # the router stays fp32
    dtype = WEIGHTS_DTYPES[weights_dtype]
    if dtype is None:
        stored = stored or torch.bfloat16
        return (2 if is_fp8(stored) else stored.itemsize) * numel
    return dtype.itemsize * numel


def checkpoint_info(path: str | Path) -> dict:
    """What a published checkpoint directory holds, from its config.json and safetensors headers only:
    family, dtypes, FP8 block grid, and bytes per component on disk and in memory per weights_dtype."""
    import torch

    from .interop.hf import open_published, published_target
    from .interop.materialize import WEIGHTS_DTYPES
    from .model import LongCatForCausalLM
    from .model.fp8 import BLOCK, fp8_parameter_names, is_fp8

    opened = open_published(path)
    try:
        info = opened.source.info
        disk: dict[str, int] = {}
        dtypes: dict[str, int] = {}
        fp8_tensors = partial = blocks = 0
        for key, t in info.items():
            weight = key[: -len("_scale_inv")] if key.endswith("weight_scale_inv") else key
            target = published_target(weight, opened.config)
            component = component_of(target[0]) if target else ("mtp" if key.startswith("model.mtp.") else "other")
            disk[component] = disk.get(component, 0) + t.nbytes
            dtype = str(t.dtype).replace("torch.", "")
            dtypes[dtype] = dtypes.get(dtype, 0) + t.nbytes
            if is_fp8(t.dtype):
                fp8_tensors += 1
                rows, cols = t.shape[-2:]
                blocks += math.prod(t.shape[:-2]) * math.ceil(rows / BLOCK) * math.ceil(cols / BLOCK)
                partial += bool(rows % BLOCK or cols % BLOCK)
        with torch.device("meta"):
            meta = LongCatForCausalLM(opened.config)
        resident = fp8_parameter_names(meta)
        stored = {name: plan.stored_dtype() for name, plan in opened.plans.items()}
        memory: dict[str, dict[str, int]] = {}
        for weights_dtype in WEIGHTS_DTYPES:
            per: dict[str, int] = {}
            for name, t in meta.state_dict().items():
                n = resident_bytes(name, tuple(t.shape), weights_dtype, name in resident, stored.get(name))
                per[component_of(name)] = per.get(component_of(name), 0) + n
            memory[weights_dtype] = per
    finally:
        opened.source.close()
    q = opened.raw.get("quantization_config") or {}
    return {
        "path": str(path),
        "family": opened.label,
        "architecture": opened.family.architecture,
        "tensors": len(info),
        "shards": len({t.file for t in info.values()}),
        "bytes_by_dtype": dtypes,
        "fp8": {"tensors": fp8_tensors, "block": [BLOCK, BLOCK], "scale_blocks": blocks,
                "tensors_with_partial_blocks": partial,
                "kept_unquantized": sorted(set(q.get("ignored_layers") or []) | set(q.get("modules_to_not_convert") or []))},
        "disk_bytes": {"total": sum(disk.values()), **disk},
        "memory_bytes": {k: {"total": sum(v.values()), **v} for k, v in memory.items()},
    }


# --- per-rank bytes of a parallel layout ----------------------------------------------------------
# The sharding rules of longcat.parallel, as arithmetic on the parameter shapes of a meta-device
# model: tensor parallelism (parallel/tensor.py) splits q_b_proj, kv_b_proj and the dense FFNs'
# gate/up along their rows (column-wise: heads and FFN width) and o_proj and down_proj along their
# columns (row-wise), in the decoder layers and the MTP heads; expert parallelism (parallel/expert.py)
# splits the stacked experts along the expert dimension; the pipeline (parallel/pipeline.py) gives
# each rank the layers of its stages, the embeddings to the first stage and the final norm and
# output head to the last (the MTP heads are not trained under pp > 1); FSDP (parallel/fsdp.py)
# shards what is left along its first dimension over dp_shard*cp ranks (experts under expert
# parallelism over dp_shard/ep*cp, along the hidden dimension when there are fewer local experts
# than ranks), rounded up as FSDP pads it. The block scales of an FP8 weight go with their blocks.
_TP_ROWS = re.compile(r"^(layers\.\d+\.self_attn\.\d+|mtp\.\d+\.self_attn)\.(q_b_proj|kv_b_proj)\.weight$"
                      r"|^(layers\.\d+\.mlps\.\d+|mtp\.\d+\.mlp)\.(gate_proj|up_proj)\.weight$")
_TP_COLUMNS = re.compile(r"^(layers\.\d+\.self_attn\.\d+|mtp\.\d+\.self_attn)\.o_proj\.weight$"
                         r"|^(layers\.\d+\.mlps\.\d+|mtp\.\d+\.mlp)\.down_proj\.weight$")
_EXPERTS = re.compile(r"^layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _split(shape: tuple[int, ...], dim: int, ways: int) -> tuple[int, ...]:
    """The largest part of `shape` cut `ways` ways along `dim` (FSDP rounds up and pads)."""
    if ways == 1 or not shape:
        return shape
    return (*shape[:dim], -(-shape[dim] // ways), *shape[dim + 1:])


def _pp_ranks_holding(name: str, config: ModelConfig, layout) -> list[int]:
    """The pipeline ranks that hold parameter `name` (every rank without a pipeline)."""
    from .parallel.pipeline import stage_layer_ranges, stages_of_rank

    ranks = list(range(layout.pp))
    if layout.pp == 1:
        return ranks
    stages = layout.num_stages
    root = name.split(".", 1)[0]
    if root == "layers":
        layer = int(name.split(".")[1])
        stage = next(s for s, r in enumerate(stage_layer_ranges(config.num_layers, stages)) if layer in r)
    elif root in ("embed_tokens", "ngram"):
        stage = 0
    elif root in ("norm", "lm_head"):
        stage = stages - 1
    elif root == "mtp":
        return []
    else:
        return ranks
    return [r for r in ranks if stage in stages_of_rank(r, layout.pp, layout.pp_stages_per_rank)]


def rank_parameters(config: ModelConfig, layout, weights_dtype: str, stored: dict | None = None) -> list[dict]:
    """What each pipeline rank of `layout` holds (every rank of one pipeline stage holds the same,
    up to FSDP's padding, which this counts): one dict per pp rank with its `ranks` (how many ranks
    hold such a share), `parameters`, `bytes` and `bytes_by_component` (in `weights_dtype`, as
    `resident_bytes` counts them; `stored`: the checkpoint's dtype per parameter)."""
    import torch

    from .model import LongCatForCausalLM
    from .model.fp8 import fp8_parameter_names

    with torch.device("meta"):
        meta = LongCatForCausalLM(config)
    resident = fp8_parameter_names(meta)
    dense_shards = layout.dp_shard * layout.cp
    expert_shards = layout.dp_shard // layout.ep * layout.cp
    out = [{"pp_rank": r, "ranks": layout.world_size // layout.pp, "parameters": 0, "bytes": 0,
            "bytes_by_component": {}} for r in range(layout.pp)]
    for name, p in meta.named_parameters():
        holders = _pp_ranks_holding(name, config, layout)
        if not holders:
            continue
        shape, fsdp_dim, fsdp_ways = tuple(p.shape), 0, dense_shards
        if _TP_ROWS.match(name):
            shape = _split(shape, 0, layout.tp)
        elif _TP_COLUMNS.match(name):
            shape = _split(shape, 1, layout.tp)
        elif _EXPERTS.match(name) and layout.ep > 1:
            shape = _split(shape, 0, layout.ep)
            fsdp_ways = expert_shards
            fsdp_dim = 1 if expert_shards > shape[0] else 0
        fp8 = name in resident and weights_dtype == "fp8"
        local = _split(shape, fsdp_dim, fsdp_ways)
        n = resident_bytes(name, local, weights_dtype, False, (stored or {}).get(name))
        if fp8:  # e4m3 weight and its fp32 block scales, each sharded like the weight
            n = math.prod(local) + 4 * math.prod(_split(fp8_scale_shape(name, shape), fsdp_dim, fsdp_ways))
        for r in holders:
            row = out[r]
            row["parameters"] += math.prod(local)
            row["bytes"] += n
            component = component_of(name)
            row["bytes_by_component"][component] = row["bytes_by_component"].get(component, 0) + n
    return out


def planner_rank_memory(config: ModelConfig, layout) -> dict:
    """The training planner's per-device memory for the same layout (zero=3: FSDP, as the runtime
    shards), its fullest pipeline stage: weights (bf16), gradients and optimizer state, in bytes,
    and the parameters its weights stand for. None values with `problems` when the planner rejects
    the layout."""
    from .plan.arch import from_longcat
    from .plan.hardware import load_hardware, load_stack
    from .plan.layout import Layout
    from .plan.train import Planner, TrainSetup

    seq_len = 4096  # the weights and their state do not depend on the batch
    planned = Layout(parallel=layout, zero=3)
    sequences = layout.dp * (layout.microbatches if layout.pp > 1 else 1)
    planner = Planner(TrainSetup(from_longcat(config), load_hardware(PLANNER_HARDWARE), load_stack("modern"),
                                 chips=layout.world_size, seq_len=seq_len, global_batch_tokens=seq_len * sequences))
    plan = planner.evaluate(planned, detail=False, even_stages=True)
    if plan is None:
        return {"weights": None, "gradients": None, "optimizer": None, "parameters": None,
                "problems": planner.check(planned)}
    return {"weights": plan.memory["weights"], "gradients": plan.memory["gradients"],
            "optimizer": plan.memory["optimizer"], "parameters": plan.memory["weights"] / PLANNER_WEIGHT_BYTES,
            "stage": plan.memory_stage, "problems": []}


# The planner's memory of weights and optimizer state does not depend on the chip; any entry serves.
PLANNER_HARDWARE = "h100"
PLANNER_WEIGHT_BYTES = 2  # TrainSetup's default precision "bf16": bf16 weights (the fp32 master is optimizer state)


def inference_rank_bytes(config: ModelConfig, layout, weights_dtype: str) -> dict:
    """What one rank of a `longcat generate --parallel tp=..,ep=..` layout holds, from the runtime's
    own cut (`parallel.inference.shard_for_inference` on a meta-device model with the dtypes a load
    gives it): parameters, and bytes of parameters and buffers (`local_bytes`; every rank holds as
    much, the splits being even)."""
    import torch

    from .interop.materialize import WEIGHTS_DTYPES
    from .model import LongCatForCausalLM
    from .parallel.inference import InferenceRanks, local_bytes, shard_for_inference
    from .parallel.sharded_load import prepare_meta_model

    with torch.device("meta"):
        model = LongCatForCausalLM(config)
    prepare_meta_model(model, dtype=WEIGHTS_DTYPES[weights_dtype] or torch.bfloat16, weights_dtype=weights_dtype)
    world = max(layout.tp, layout.ep)
    # rank 0 of the world; no process group is needed to cut a meta model
    shard_for_inference(model, InferenceRanks(layout, 0, world, 0, 0, None, None))
    by_component: dict[str, int] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        component = component_of(name)
        by_component[component] = by_component.get(component, 0) + t.numel() * t.element_size()
    return {"pp_rank": 0, "ranks": world, "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": local_bytes(model), "bytes_by_component": by_component}


def planner_serve_memory(config: ModelConfig, layout, weights_dtype: str) -> dict:
    """The serving planner's weights per device (`longcat plan serve --tp T --ep E --weights-dtype`)."""
    from .plan.arch import from_longcat
    from .plan.hardware import load_hardware
    from .plan.serve import DTYPE_BYTES, ServeSetup, serve_plan

    if weights_dtype not in DTYPE_BYTES:
        return {"weights": None, "problems": [f"the planner has no --weights-dtype {weights_dtype}"]}
    plan = serve_plan(ServeSetup(from_longcat(config), load_hardware(PLANNER_HARDWARE), chips=max(layout.tp, layout.ep),
                                 tp=layout.tp, ep=layout.ep, weights_dtype=weights_dtype, engine="longcat"))
    return {"weights": plan["weights_gib_per_device"] * 2**30,
            "weights_breakdown": {k: v * 2**30 for k, v in plan["weights_breakdown_gib"].items()}, "problems": []}


def layout_purpose(layout) -> str:
    """"train" for a layout only training runs (data, pipeline or context parallel), else "generate"."""
    return "train" if max(layout.dp_shard, layout.dp_replicate, layout.pp, layout.cp) > 1 else "generate"


def parallel_info(config: ModelConfig, layout_text: str, *, weights_dtype: str, nproc: int | None = None,
                  stored: dict | None = None, purpose: str | None = None) -> dict:
    """Per-rank parameters and bytes of `layout_text` (a --parallel string) for `purpose` ("train":
    `longcat train`'s sharding, "generate": `longcat generate`'s; default from the layout) next to
    the planner's per-device memory for it; ConfigError naming the degree to change for a layout
    that cannot run."""
    from .model.fp8 import BLOCK
    from .parallel.layout import ParallelLayout

    layout = ParallelLayout.parse(layout_text)
    purpose = purpose or layout_purpose(layout)
    block = BLOCK if weights_dtype == "fp8" else None
    if purpose == "generate":
        world = max(layout.tp, layout.ep)
        layout.validate_inference(config, nproc or world, fp8_block=block)
        ranks = [inference_rank_bytes(config, layout, weights_dtype)]
        planner = planner_serve_memory(config, layout, weights_dtype)
        difference = None if planner["weights"] is None else planner["weights"] / ranks[0]["bytes"] - 1
    else:
        world = layout.world_size
        layout.validate(config, nproc or world, fp8_block=block)
        ranks = rank_parameters(config, layout, weights_dtype, stored)
        planner = planner_rank_memory(config, layout)
        most = max(r["parameters"] for r in ranks)
        difference = None if planner["parameters"] is None else planner["parameters"] / most - 1
    fullest = max(ranks, key=lambda r: r["bytes"])
    named = ("dp_replicate", "dp_shard", "ep", "tp", "cp", "pp", "pp_stages_per_rank")
    degrees = [f"{d}={getattr(layout, d)}" for d in named if getattr(layout, d) > 1]
    return {
        "layout": ",".join(degrees) or "one rank", "purpose": purpose, "world_size": world,
        "weights_dtype": weights_dtype,
        "per_pp_rank": ranks, "max_rank_bytes": fullest["bytes"], "max_rank_parameters": fullest["parameters"],
        "planner": planner,
        # train: the planner's parameters per device against these; generate: its weight bytes against these bytes
        "planner_difference": difference,
    }


def _is_checkpoint(spec: str) -> bool:
    from .interop.runs import HF_MODEL, classify
    from .interop.safetensors_io import CheckpointError

    path = Path(spec)
    if spec in PRESETS or not path.is_dir():
        return False
    try:
        return classify(path) == HF_MODEL
    except CheckpointError:
        return False


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def run(args: argparse.Namespace) -> int:
    checkpoint = None
    if _is_checkpoint(args.model):
        from .errors import UserError
        from .interop.safetensors_io import CheckpointError

        try:
            checkpoint = checkpoint_info(args.model)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
    config = resolve_config(args.model)
    info = model_info(config)
    if checkpoint is not None:
        info["checkpoint"] = checkpoint
    if args.parallel is not None:
        weights_dtype = args.weights_dtype
        if weights_dtype is None:  # as stored: an FP8 checkpoint stays FP8
            weights_dtype = "fp8" if checkpoint is not None and checkpoint["fp8"]["tensors"] else "bf16"
        held, stored = (config, None) if checkpoint is None else _as_loaded(args.model)
        info["parallel"] = parallel_info(held, args.parallel, weights_dtype=weights_dtype, nproc=args.nproc,
                                         stored=stored, purpose=args.purpose)
    elif args.weights_dtype is not None or args.nproc is not None or args.purpose is not None:
        from .errors import UserError

        raise UserError("--weights-dtype, --nproc and --for describe a --parallel layout; add --parallel LAYOUT, "
                        "e.g. --parallel dp_shard=2,ep=2")
    if args.json:
        if not args.with_config:
            info.pop("config")
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"longcat info {args.model}", show_header=True)
    table.add_column("component")
    table.add_column("parameters", justify="right")
    for name, n in info["params_by_component"].items():
        table.add_row(name, _fmt(n))
    table.add_row("[bold]total (without MTP)", f"[bold]{_fmt(info['total_params'])}")
    table.add_row("total with MTP", _fmt(info["total_params_with_mtp"]))
    table.add_row(
        f"active per token ({info['ffn_slots_per_token']:.2f} FFN-expert slots)", _fmt(info["active_params"])
    )
    console.print(table)
    kv = info["kv_cache_bytes_per_token"]
    console.print(
        f"KV cache per token: latent MLA {kv['latent_bf16']:,} B (bf16), expanded per-head "
        f"{kv['expanded_bf16']:,} B ({kv['expanded_bf16'] / kv['latent_bf16']:.1f}x larger)"
    )
    w = info["weight_bytes"]
    console.print(f"Weights: {_gib(w['bf16'])} in bf16, {_gib(w['fp8'])} in fp8")
    if checkpoint is not None:
        _print_checkpoint(console, checkpoint)
    if "parallel" in info:
        _print_parallel(console, info["parallel"])
    return 0


def _as_loaded(path: str) -> tuple[ModelConfig, dict]:
    """The config `longcat.load` builds for a published checkpoint (with its MTP heads) and the dtype
    each of our parameters is stored in (headers only)."""
    from .interop.hf import open_published

    opened = open_published(path)
    try:
        return opened.config, {name: plan.stored_dtype() for name, plan in opened.plans.items()}
    finally:
        opened.source.close()


def _bytes(n: int) -> str:
    return _gib(n) if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _print_checkpoint(console, ck: dict) -> None:
    from rich.table import Table

    dtypes = ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(ck["bytes_by_dtype"].items()))
    console.print(f"Checkpoint: {ck['family']} ({ck['architecture']}), {ck['tensors']:,} tensors in "
                  f"{ck['shards']} shard(s); dtypes on disk: {dtypes}")
    fp8 = ck["fp8"]
    if fp8["tensors"]:
        console.print(f"FP8: {fp8['tensors']:,} e4m3 tensors, one fp32 scale per {fp8['block'][0]}x{fp8['block'][1]} "
                      f"block ({fp8['scale_blocks']:,} blocks; {fp8['tensors_with_partial_blocks']:,} tensors with a "
                      f"partial last block); {len(fp8['kept_unquantized'])} modules listed as kept unquantized")
    table = Table(title="bytes per component", show_header=True)
    table.add_column("component")
    table.add_column("on disk", justify="right")
    modes = list(ck["memory_bytes"])
    for mode in modes:
        table.add_column(f"memory, {mode}", justify="right")
    names = [k for k in ck["disk_bytes"] if k != "total"]
    names += [k for k in ck["memory_bytes"][modes[0]] if k not in names and k != "total"]
    for name in names + ["total"]:
        table.add_row(name, _bytes(ck["disk_bytes"].get(name, 0)),
                      *(_bytes(ck["memory_bytes"][m].get(name, 0)) for m in modes))
    console.print(table)


def _print_parallel(console, par: dict) -> None:
    from rich.table import Table

    planner = par["planner"]
    console.print(f"Per rank for `longcat {par['purpose']}` on {par['layout']} ({par['world_size']} ranks), weights "
                  f"{par['weights_dtype']}:")
    table = Table(show_header=True)
    table.add_column("pipeline rank")
    table.add_column("ranks like it", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column(f"bytes ({par['weights_dtype']})", justify="right")
    for r in par["per_pp_rank"]:
        table.add_row(str(r["pp_rank"]), str(r["ranks"]), _fmt(r["parameters"]), _bytes(r["bytes"]))
    console.print(table)
    if planner["weights"] is None:
        console.print(f"planner: no figure for this layout ({'; '.join(planner['problems'])})")
    elif par["purpose"] == "generate":
        console.print(f"planner (`longcat plan serve --tp/--ep`): weights {_bytes(planner['weights'])} per device "
                      f"({100 * par['planner_difference']:+.1f}% against {_bytes(par['max_rank_bytes'])} here)")
    else:
        console.print(
            f"planner (`longcat plan train`, zero=3 as FSDP runs, its fullest stage): {_fmt(planner['parameters'])} "
            f"parameters per device ({100 * par['planner_difference']:+.1f}% against the fullest rank here, "
            f"{_fmt(par['max_rank_parameters'])}); weights {_bytes(planner['weights'])} (bf16), gradients "
            f"{_bytes(planner['gradients'])}, optimizer state {_bytes(planner['optimizer'])}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="parameter counts, active parameters, KV-cache and weight memory of a model",
        description="Count a model's parameters from its config (nothing is allocated, even for 1.6T). Given a "
                    "published checkpoint directory (LongCat-Flash-Chat, -Flash-Lite, LongCat-2.0, BF16 or FP8), "
                    "also print the family it is, its dtypes and FP8 block grid, and its bytes per component on "
                    "disk and in memory for each --weights-dtype of `longcat generate` (headers only: no weights "
                    "are read).",
    )
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a config file, a model directory or a published "
                                 "checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--with-config", action="store_true", help="include the full config in --json output")
    p.add_argument("--parallel", default=None, metavar="LAYOUT",
                   help="a layout as `longcat generate --parallel` (tp=2,ep=2) or `longcat train --parallel` "
                        "(dp_shard=4,ep=4, tp=2,pp=2) takes it: print the parameters and bytes each rank holds under "
                        "it, and the planner's per-device memory for the same layout next to them")
    p.add_argument("--for", dest="purpose", choices=["generate", "train"], default=None,
                   help="with --parallel: which command's sharding to count (generate: tp and ep only, experts over "
                        "the tp ranks; train: FSDP, EP from the data ranks, TP, PP). Default: train when the layout "
                        "has dp_shard, dp_replicate, pp or cp above 1, else generate")
    p.add_argument("--weights-dtype", choices=["fp8", "bf16", "fp32"], default=None,
                   help="with --parallel: the dtype the weights are held in (fp8: expert and projection weights as "
                        "e4m3 with 128x128 block scales, the rest as stored). Default: as stored (an FP8 checkpoint "
                        "stays FP8; presets and BF16 checkpoints bf16)")
    p.add_argument("--nproc", type=int, default=None,
                   help="with --parallel: the world size to check the layout against (default: the product of its "
                        "degrees)")
    p.set_defaults(func=run)
