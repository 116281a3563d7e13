"""`longcat plan calibrate --from DIR/report.json`: a hardware entry from a measured validation report.

The report (`longcat bench run`) holds a real training run on the machine: step time for a known
model and workload, peak memory, the runtime's own memory and the peak FLOP/s it used for MFU. The
entry starts from the hardware entry the report's prediction used (the calibration written next to
the report, or the catalog entry it names), takes the peak, the memory and the runtime's share from
the report, then scales every efficiency factor (GEMM, expert GEMM, attention, element-wise
memory) by one common factor, found by bisection, until the planner predicts the measured step time
for the report's own configuration. The planner then answers from the user's measurement.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict

EFFICIENCIES = ("gemm_efficiency", "expert_gemm_efficiency", "attention_efficiency", "memory_efficiency")
SCHEMA = "longcat.bench.report/1"


def read_report(path: str | Path) -> tuple[dict, Path]:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--from {path}: no such file; give the report.json that `longcat bench run --out DIR` "
                          "wrote") from None
    except ValueError as exc:
        raise ConfigError(f"--from {path}: not JSON ({exc})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise ConfigError(f"--from {path}: not a longcat bench report (schema {SCHEMA}); write one with "
                          "`longcat bench run --out DIR`")
    if not report.get("results", {}).get("train"):
        raise ConfigError(f"--from {path}: the report has no train section ({report.get('reasons', {}).get('train')}); "
                          "run `longcat bench run` without --skip train")
    return report, p


def _base_hardware(report: dict, report_path: Path):
    from .hardware import Hardware, load_hardware

    calibration = report_path.parent / "hardware-calibration.toml"
    if calibration.exists():
        return load_hardware(str(calibration)), f"{calibration}"
    pred = report["results"]["train"].get("predicted") or {}
    if pred.get("hardware"):
        try:
            return load_hardware(pred["hardware"]), f"catalog entry {pred['hardware']}"
        except ConfigError:
            pass
    hw = Hardware(name="from-report", hbm_bandwidth_gbs=50.0)
    return hw, "defaults (no hardware entry next to the report)"


def _predict(arch, hw, train: dict) -> float:
    """The planner's step time for the report's training configuration on `hw`."""
    from .hardware import load_stack
    from .layout import Layout
    from .train import Planner, TrainSetup

    w = train["workload"]
    setup = TrainSetup(arch, hw, load_stack("pytorch-eager"), chips=1, seq_len=w["seq_len"],
                       global_batch_tokens=w["seq_len"] * w["micro_batch"], optimizer="adamw", precision="autocast")
    layout = Layout(tp=1, pp=1, ep=1, cp=1, dp=1, zero=0, recompute="none", microbatch=w["micro_batch"],
                    schedule="1f1b")
    plan = Planner(setup).evaluate(layout)
    if plan is None or not math.isfinite(plan.step_time_s):
        raise ConfigError("the planner finds no plan for the report's training configuration on this entry; "
                          "raise hbm_gib with --hw-set or re-run the report")
    return plan.step_time_s


def hardware_from_report(path: str | Path, name: str) -> tuple[str, dict[str, Any]]:
    """(TOML text of the entry, a summary of the fit)."""
    import dataclasses

    from .arch import from_longcat

    report, report_path = read_report(path)
    train, env = report["results"]["train"], report["environment"]
    arch = from_longcat(from_dict(report["model"]["config"], source=str(report_path)), name=report["model"]["name"])
    hw, base_source = _base_hardware(report, report_path)
    hw = dataclasses.replace(hw, provenance=dict(hw.provenance), notes=dict(hw.notes))
    hw.name = name
    hw.peak_tflops_bf16 = env["peak_flops_per_s"] / 1e12
    accel = [a for a in env.get("accelerators", []) if a.get("memory_gib")]
    device = env.get("device", "cpu")
    if device != "cpu" and accel:
        hw.hbm_gib = accel[0]["memory_gib"]
    elif env.get("memory_gib"):
        hw.hbm_gib = env["memory_gib"]
    if train.get("runtime_rss_gib") and device == "cpu":
        hw.reserved_gib = train["runtime_rss_gib"]
    if hw.expert_gemm_efficiency == 0:
        hw.expert_gemm_efficiency = hw.gemm_efficiency
    measured = train["step_time_s"]["median"]
    base = {k: getattr(hw, k) for k in EFFICIENCIES}

    def predicted(scale: float) -> float:
        for k in EFFICIENCIES:
            setattr(hw, k, min(1.0, base[k] * scale))
        return _predict(arch, hw, train)

    # step time falls as the efficiencies rise: bisect the common scale in log space
    lo, hi = 1e-3, 1.0 / min(base.values())  # at hi every efficiency is 1
    if predicted(hi) > measured:
        scale, note = hi, "even at efficiency 1 the planner predicts a slower step than measured: efficiencies capped at 1"
    elif predicted(lo) < measured:
        scale, note = lo, "the measured step is slower than the planner predicts at 1/1000 of the efficiencies"
    else:
        for _ in range(50):
            mid = math.sqrt(lo * hi)
            if predicted(mid) > measured:
                lo = mid
            else:
                hi = mid
        scale, note = math.sqrt(lo * hi), None
    final = predicted(scale)
    fit = {"report": str(report_path), "base": base_source, "measured_step_time_s": measured,
           "predicted_step_time_s": final, "efficiency_scale": scale, "note": note,
           "workload": train["workload"], "model": report["model"]["name"],
           "efficiencies": {k: getattr(hw, k) for k in EFFICIENCIES}}
    return _to_toml(hw, report, fit), fit


def _to_toml(hw, report: dict, fit: dict) -> str:
    env = report["environment"]
    measured = ["peak_tflops_bf16", *EFFICIENCIES, "hbm_gib", "reserved_gib"]
    measured += [k for k, source in hw.provenance.items() if source == "measured" and k not in measured]
    described = f"{env['cpu'].get('model')}, {env.get('device')}, {env.get('threads')} thread(s), {env.get('clock')} clock"
    lines = [f'name = "{hw.name}"',
             f'description = "from the validation report {report["run"]["id"]} ({described}), '
             f'`longcat plan calibrate --from`"', "", "[measured]"]
    lines += [f"{k} = {getattr(hw, k):.6g}" for k in measured]
    lines += ["", "[estimated]"]
    skip = {"name", "description", "provenance", "notes", *measured}
    import dataclasses

    for f in dataclasses.fields(hw):
        if f.name not in skip:
            value = getattr(hw, f.name)
            lines.append(f"{f.name} = {value:.6g}" if isinstance(value, float) else f"{f.name} = {value}")
    w = fit["workload"]
    lines += ["", "[notes]",
              f'peak_tflops_bf16 = "{env["peak_flops_source"]}"',
              f'gemm_efficiency = "all efficiencies of {fit["base"]} scaled by {fit["efficiency_scale"]:.4g} so the '
              f'planner predicts the measured step: {fit["measured_step_time_s"]:.4g} s for {fit["model"]}, '
              f'{w["micro_batch"]} x {w["seq_len"]} tokens, AdamW, bf16 autocast"',
              'reserved_gib = "the training process\'s resident memory before the model (report train.runtime_rss_gib)"',
              ""]
    return "\n".join(lines)


def run_from_report(args) -> int:
    from .calibrate import default_output

    text, fit = hardware_from_report(args.from_report, args.name)
    path = Path(args.output) if args.output else default_output(args.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if args.json:
        print(json.dumps({**fit, "path": str(path)}, indent=2))
        return 0
    print(f"{fit['model']}: measured step {fit['measured_step_time_s']:.4g} s; the planner predicts "
          f"{fit['predicted_step_time_s']:.4g} s with the efficiencies of {fit['base']} x {fit['efficiency_scale']:.3g}"
          + (f" ({fit['note']})" if fit["note"] else ""))
    print(f"wrote {path} (use --hardware {args.name if not args.output else path})")
    return 0


__all__ = ["hardware_from_report", "run_from_report"]
