"""`longcat info`: parameter counts, active parameters, KV-cache and weight memory of a model."""

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


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def run(args: argparse.Namespace) -> int:
    info = model_info(resolve_config(args.model))
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
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="parameter counts, active parameters, KV-cache and weight memory of a model",
        description="Count a model's parameters from its config (nothing is allocated, even for 1.6T).",
    )
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a config file, or a model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--with-config", action="store_true", help="include the full config in --json output")
    p.set_defaults(func=run)
