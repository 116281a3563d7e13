"""`longcat info`: parameter counts, active parameters, KV-cache and weight memory of a model; for
a published checkpoint directory also what it is (family, dtypes, FP8 block grid) and its bytes per
component on disk and in memory for each `weights_dtype`."""

from __future__ import annotations

import argparse
import json
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


def checkpoint_info(path: str | Path) -> dict:
    """What a published checkpoint directory holds, from its config.json and safetensors headers only:
    family, dtypes, FP8 block grid, and bytes per component on disk and in memory per weights_dtype."""
    import math

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
        memory: dict[str, dict[str, int]] = {}
        for weights_dtype, dtype in WEIGHTS_DTYPES.items():
            per: dict[str, int] = {}
            for name, t in meta.state_dict().items():
                if name in resident and weights_dtype == "fp8":
                    *lead, rows, cols = t.shape
                    parts = 2 if name.endswith("gate_up_proj") else 1
                    grid = math.prod(lead) * parts * math.ceil(rows / parts / BLOCK) * math.ceil(cols / BLOCK)
                    n = t.numel() + 4 * grid
                elif ".router." in name:
                    n = 4 * t.numel()  # the router stays fp32
                else:
                    stored = opened.plans[name].stored_dtype() if name in opened.plans else torch.bfloat16
                    if dtype is None:
                        dtype_bytes = 2 if is_fp8(stored) else stored.itemsize
                    else:
                        dtype_bytes = dtype.itemsize
                    n = dtype_bytes * t.numel()
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
    info = model_info(resolve_config(args.model))
    if checkpoint is not None:
        info["checkpoint"] = checkpoint
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
    return 0


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
    p.set_defaults(func=run)
