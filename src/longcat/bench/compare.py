"""`longcat bench compare A/report.json B/report.json ...`: reports side by side, with ratios to the first.

A report is cut into cells (the train run, each decode cell, the serve load, each numerics
precision, each point of the OOM frontier). Every cell carries what must be equal for its numbers to
mean the same thing: the model (its config hash), the workload and the precision, and for timed
cells the clock and the parallel layout they ran on (one process, or N ranks of `--nproc N
--parallel LAYOUT`). A cell whose identity differs from the first report's is refused with the
fields that differ, never divided.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError

# per cell kind: (metric key, label, higher is better)
METRICS = {
    "train": [("tokens_per_s", "tokens/s", True), ("step_time_s", "step time s", False), ("mfu", "MFU", True),
              ("peak_rss_gib", "peak RSS GiB", False)],
    "decode": [("prefill_tok_per_s", "prefill tok/s", True), ("decode_tok_per_s", "decode tok/s", True)],
    "serve": [("output_tok_per_s", "output tok/s", True), ("ttft_p50_ms", "TTFT p50 ms", False),
              ("tpot_p50_ms", "TPOT p50 ms", False), ("e2el_p99_ms", "E2EL p99 ms", False)],
    "numerics": [("kl_mean", "KL mean", False), ("top1_agreement", "top-1 agreement", True)],
    "oom": [("max_batch", "largest batch", True)],
}


def load_report(path: str | Path) -> dict:
    from .report import SCHEMA

    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such report; give the report.json that `longcat bench run --out DIR` wrote") from None
    except ValueError as exc:
        raise UserError(f"{path}: not JSON ({exc}); give a report.json written by `longcat bench run`") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path}: schema {found!r}, expected {SCHEMA!r}; re-run `longcat bench run` with this version")
    return data


SINGLE_PROCESS = "single process"  # the layout of a cell measured in one process (reports before --nproc too)


def cells(report: dict) -> dict[tuple, dict[str, Any]]:
    """{cell key: {"identity": {...}, "values": {...}}} of one report."""
    model = report["model"]["config_hash"]
    clock = report["environment"].get("clock")
    res = report["results"]
    out: dict[tuple, dict[str, Any]] = {}
    train = res.get("train")
    if train:
        out[("train",)] = {"identity": {"model": model, "workload": train["workload"], "precision": train["precision"],
                                        "clock": clock, "layout": train.get("layout", SINGLE_PROCESS)},
                           "values": {"tokens_per_s": train["tokens_per_s"],
                                      "step_time_s": train["step_time_s"]["median"], "mfu": train["mfu"],
                                      "peak_rss_gib": train["peak_rss_gib"]}}
    decode = res.get("decode")
    for c in (decode or {}).get("cells", []):
        out[("decode", c["mode"], c["workload"])] = {
            "identity": {"model": model, "workload": c["workload"], "precision": c["precision"], "clock": clock,
                         "layout": c.get("layout", SINGLE_PROCESS)},
            "values": {"prefill_tok_per_s": c["prefill_tok_per_s"], "decode_tok_per_s": c["decode_tok_per_s"]}}
    serve = res.get("serve")
    if serve:
        target = serve["target"]
        out[("serve", serve["workload"]["name"])] = {
            # ours serves the report's model; another server is known only by what it says it serves
            "identity": {"model": model if target["config_hash"] else f"{target['served_model']} at {target['url']}",
                         "workload": serve["workload"], "layout": target["layout"]},
            "values": {"output_tok_per_s": serve["output_tok_per_s"], "ttft_p50_ms": serve["ttft_ms"]["p50"],
                       "tpot_p50_ms": serve["tpot_ms"]["p50"], "e2el_p99_ms": serve["e2el_ms"]["p99"]}}
    numerics = res.get("numerics")
    for name, row in ((numerics or {}).get("inference") or {}).items():
        out[("numerics", name)] = {
            "identity": {"model": model, "workload": numerics["held_out"], "precision": row["precision"]},
            "values": {"kl_mean": row["kl_mean"], "top1_agreement": row["top1_agreement"]}}
    frontier = res.get("oom_frontier")
    for r in (frontier or {}).get("measured", []):
        out[("oom", frontier["mode"], r["skew"], f"seq{r['seq_len']}")] = {
            "identity": {"model": model, "workload": f"{frontier['mode']} {frontier['workload']}",
                         "precision": "bf16 autocast" if frontier["mode"] == "train" else "fp32",
                         "memory_budget_gib": frontier["memory_budget_gib"]},
            "values": {"max_batch": r["max_batch"]}}
    return out


def differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def compare_reports(reports: list[dict], names: list[str]) -> list[dict]:
    """One row per (cell, metric) of the first report: each report's value and its ratio to the
    first, or why that report's cell was refused."""
    if len(reports) < 2:
        raise UserError("compare needs at least two reports: longcat bench compare A/report.json B/report.json")
    per_report = [cells(r) for r in reports]
    rows = []
    keys = list(per_report[0]) + [k for c in per_report[1:] for k in c if k not in per_report[0]]
    for key in dict.fromkeys(keys):
        base = per_report[0].get(key)
        kind = key[0]
        for metric, label, higher in METRICS[kind]:
            row = {"cell": " ".join(key), "metric": label, "higher_is_better": higher, "values": [], "ratios": [],
                   "refused": []}
            for i, c in enumerate(per_report):
                cell = c.get(key)
                value = cell["values"].get(metric) if cell else None
                row["values"].append(value)
                if i == 0:
                    continue
                if cell is None or base is None:
                    row["ratios"].append(None)
                    row["refused"].append(f"{names[i if cell is None else 0]} has no such cell")
                    continue
                diff = differences(base["identity"], cell["identity"])
                if diff:
                    row["ratios"].append(None)
                    row["refused"].append(f"{names[i]} differs from {names[0]} in " + "; ".join(diff))
                    continue
                base_value = base["values"].get(metric)
                ok = value is not None and base_value not in (None, 0)
                row["ratios"].append(value / base_value if ok else None)
            rows.append(row)
    return rows


def environment_line(report: dict) -> str:
    env = report["environment"]
    acc = ", ".join(a["name"] for a in env.get("accelerators", [])) or "no accelerator"
    return (f"{env['cpu']['model']} ({env['cpu']['usable_cores']} cores), {acc}; {env['device']}, {env['threads']} "
            f"thread(s), {env['clock']} clock, {env.get('layout', SINGLE_PROCESS)}; torch "
            f"{env['versions'].get('torch')}; shared="
            f"{report['validity'].get('machine_shared')}")


def print_comparison(reports: list[dict], names: list[str], rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=200)
    for name, report in zip(names, reports):
        con.print(f"[bold]{name}[/]: {environment_line(report)}", highlight=False)
    table = Table()
    table.add_column("cell")
    table.add_column("metric")
    for i, name in enumerate(names):
        table.add_column(name, justify="right")
        if i:
            table.add_column(f"{name} / {names[0]}", justify="right")
    refusals = []
    for row in rows:
        cols = [row["cell"], row["metric"]]
        for i, value in enumerate(row["values"]):
            cols.append("–" if value is None else f"{value:,.4g}")
            if i:
                ratio = row["ratios"][i - 1]
                cols.append("refused" if ratio is None and row["refused"] else
                            ("–" if ratio is None else f"{ratio:.2f}x"))
        refusals += [f"{row['cell']}: {r}" for r in row["refused"]]
        table.add_row(*cols)
    con.print(table)
    for line in dict.fromkeys(refusals):
        con.print(f"refused {line}", highlight=False, soft_wrap=True)


__all__ = ["cells", "compare_reports", "load_report", "print_comparison"]
