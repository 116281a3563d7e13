"""Check the planner against published training runs (longcat/catalog/validation/*.toml).

Two table formats: the Megatron-LM 2021 weak-scaling table (GPT rows, `megatron_rows`) and
published runs of any catalog model (`published_rows`: `[[run]]` entries with a model, hardware,
stack, precision, chips, sequence, batch, the layout the source states, one reported metric and
its source). `validation_tables` runs every table in the catalog.

Megatron-LM 2021 (Narayanan et al., Table 1): GPT models from 1.7B to 1T parameters on up to 3072
A100s. For each row the published tensor/pipeline sizes are fixed, the rest (micro-batch size,
virtual stages) is left to the planner, and the predicted per-GPU throughput is compared with the
published one. Both count FLOPs the Megatron way: 4 forward passes with full recomputation and
non-causal attention, which is what `hw_tflops_per_device` reports for a stack without flash
attention (`--stack megatron-2021`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..catalog import catalog_dir
from ..config import ConfigError
from .arch import Architecture, load_architecture
from .hardware import load_hardware, load_stack
from .layout import parse_layout
from .train import Planner, TrainPlan, TrainSetup, search

METRICS = ("mfu", "tflops_per_device", "gpu_hours_per_trillion_tokens", "tokens_per_day", "days")
_RUN_KEYS = {"name", "source", "model", "hardware", "stack", "precision", "optimizer", "chips", "seq_len",
             "global_batch_tokens", "tokens", "layout", "metric", "published", "stack_set"}


def default_table() -> Path:
    """The Megatron-LM 2021 Table 1 runs, shipped with the package."""
    return catalog_dir("validation") / "megatron_2021_table1.toml"


def gpt_architecture(row: dict[str, Any], vocab: int, seq_len: int) -> Architecture:
    """The GPT of the Megatron paper: MHA, GELU MLP of 4h, LayerNorm, biases, dropout, tied
    embeddings, learned positions."""
    h = row["hidden"]
    return Architecture(
        name=f"GPT {row['params_b']}B", source="Narayanan et al. 2021, Table 1",
        vocab_size=vocab, hidden_size=h, num_layers=row["layers"], num_heads=row["heads"],
        attention="gqa", mlp="gelu", ffn_hidden_size=4 * h, norm="layernorm", bias=True, dropout=True,
        tied_embeddings=True, learned_positions=seq_len,
    )


def megatron_rows(path: str | Path | None = None, *, free_search: bool = True) -> list[dict[str, Any]]:
    path = Path(path) if path else default_table()
    data = _load(path)
    hw = load_hardware(data.get("hardware", "a100-80gb"))
    stack = load_stack("megatron-2021")
    seq, vocab = int(data["seq_len"]), int(data["vocab"])
    interleaved = "interleaved" in data.get("schedule", "")
    rows = []
    for run in data["run"]:
        arch = gpt_architecture(run, vocab, seq)
        setup = TrainSetup(arch, hw, stack, chips=run["gpus"], seq_len=seq, global_batch_tokens=run["global_batch"] * seq)
        planner = Planner(setup)
        fixed = dict(tp=run["tp"], pp=run["pp"], cp=1, ep=1, dp=run["gpus"] // (run["tp"] * run["pp"]),
                     zero=0, recompute=data.get("recompute", "full"))
        plans = []
        if interleaved and run["pp"] > 1:
            plans = search(planner, {**fixed, "schedule": "interleaved"}, top=1)
        if not plans:  # pp = 1, or no interleaving divides the layers
            plans = search(planner, {**fixed, "schedule": "1f1b"}, top=1)
        if not plans:
            raise ConfigError(f"no valid layout for the {run['params_b']}B row")
        plan = plans[0]
        row = {
            "params_b": run["params_b"], "params_b_counted": arch.total_params / 1e9,
            "gpus": run["gpus"], "tp": run["tp"], "pp": run["pp"], "global_batch": run["global_batch"],
            "published_tflops": run["tflops_per_gpu"], "predicted_tflops": plan.hw_tflops_per_device,
            "error": plan.hw_tflops_per_device / run["tflops_per_gpu"] - 1,
            "layout": str(plan.layout), "fits": plan.fits, "memory_gib": plan.memory_gib["total"],
            "mfu": plan.mfu, "step_time_s": plan.step_time_s,
        }
        if free_search:
            own = search(planner, {}, top=1)
            if own:
                row["own_layout"] = str(own[0].layout)
                row["own_tflops"] = own[0].hw_tflops_per_device
                row["own_speedup"] = own[0].tokens_per_s / plan.tokens_per_s
        rows.append(row)
    return rows


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"validation table not found: {path}; pass an existing TOML with --file, or omit --file "
                          "for every packaged table")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc


def metric_value(plan: TrainPlan, metric: str) -> float:
    if metric == "gpu_hours_per_trillion_tokens":
        return plan.chips_used * 1e12 / plan.tokens_per_s / 3600
    if metric == "days":
        return plan.days
    return float(getattr(plan, metric))


def published_rows(path: str | Path, *, free_search: bool = True) -> list[dict[str, Any]]:
    """Each published run: the planner's figure under the stated layout against the reported one."""
    path = Path(path)
    data = _load(path)
    rows = []
    for run in data.get("run", []):
        where = f"{path.name}: run '{run.get('name', '?')}'"
        unknown = sorted(set(run) - _RUN_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_RUN_KEYS))}")
        if run.get("metric") not in METRICS:
            raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}")
        arch = load_architecture(run["model"])
        hw = load_hardware(run["hardware"])
        stack = load_stack(run.get("stack", "modern"), run.get("stack_set"))
        setup = TrainSetup(arch, hw, stack, chips=int(run["chips"]), seq_len=int(run["seq_len"]),
                           global_batch_tokens=float(run["global_batch_tokens"]), tokens=float(run.get("tokens", 0.0)),
                           optimizer=run.get("optimizer", "adamw"), precision=run.get("precision", "bf16"))
        planner = Planner(setup)
        fixed = parse_layout(run.get("layout", ""))
        plans = search(planner, fixed, top=1)
        if not plans:
            raise ConfigError(f"{where}: no valid layout for '{run.get('layout', '')}'")
        plan = plans[0]
        predicted = metric_value(plan, run["metric"])
        row = {
            "name": run["name"], "source": run["source"], "metric": run["metric"], "published": run["published"],
            "predicted": predicted, "error": predicted / run["published"] - 1, "layout": str(plan.layout),
            "fits": plan.fits, "memory_gib": plan.memory_gib["total"], "mfu": plan.mfu,
            "step_breakdown_s": {k: v for k, v in plan.step.items() if v},
        }
        if free_search and fixed:
            own = search(planner, {}, top=1)
            if own:
                row["own_layout"] = str(own[0].layout)
                row["own_speedup"] = own[0].tokens_per_s / plan.tokens_per_s
        rows.append(row)
    return rows


def is_megatron_table(path: Path) -> bool:
    return "vocab" in _load(path)


def validation_tables(path: str | Path | None = None, *, free_search: bool = True) -> list[tuple[Path, str, list[dict[str, Any]]]]:
    """(table, kind, rows) for one table or every packaged one: kind 'megatron' or 'published'."""
    paths = [Path(path)] if path else sorted(catalog_dir("validation").glob("*.toml"))
    out = []
    for p in paths:
        if is_megatron_table(p):
            out.append((p, "megatron", megatron_rows(p, free_search=free_search)))
        else:
            out.append((p, "published", published_rows(p, free_search=free_search)))
    return out


__all__ = ["megatron_rows", "published_rows", "validation_tables", "default_table", "gpt_architecture", "metric_value",
           "METRICS"]
