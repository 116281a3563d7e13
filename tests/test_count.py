"""Parameter accounting: the analytic counter against real modules, the published totals, and
`longcat info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longcat.config import PRESETS, preset
from longcat.model import build_model, count_parameters, kv_cache_bytes_per_token

COMPONENTS = ["embedding", "ngram", "attention", "dense_ffn", "experts", "router", "mtp", "norm"]


def _component(name: str) -> str:
    """Which count_parameters component a parameter name belongs to."""
    parts = name.split(".")
    if parts[0] in ("embed_tokens", "lm_head"):
        return "embedding"
    if parts[0] == "ngram":
        return "ngram"
    if parts[0] == "mtp":
        return "mtp"
    if parts[0] == "norm":
        return "norm"
    assert parts[0] == "layers", name
    kind = parts[2]
    if kind == "self_attn":
        return "attention"
    if kind == "mlps":
        return "dense_ffn"
    if kind in ("input_layernorm", "post_attention_layernorm"):
        return "norm"
    if kind == "mlp":
        return {"experts": "experts", "router": "router"}[parts[3]]
    raise AssertionError(f"unclassified parameter {name}")


def _measured(model) -> dict[str, int]:
    out = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        out[_component(name)] += p.numel()
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_counter_matches_meta_model(name):
    cfg = preset(name)
    model = build_model(cfg, device="meta")
    # nothing allocated: every parameter and buffer lives on the meta device
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    counts = count_parameters(cfg)
    assert counts.by_component == _measured(model)
    assert counts.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_counter_matches_real_cpu_model(name):
    cfg = preset(name)
    model = build_model(cfg, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    counts = count_parameters(cfg)
    assert counts.by_component == _measured(model)
    assert counts.total == sum(p.numel() for p in model.parameters())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.mark.parametrize(
    "name, published",
    [("flash", 560.7e9), ("flash-lite", 68.6e9), ("longcat2", 1638.6e9)],
)
def test_published_totals(name, published):
    counts = count_parameters(preset(name))
    total = counts.total - counts.by_component["mtp"]  # published totals exclude the MTP heads
    assert _rel(total, published) < 1e-3, f"{name}: {total / 1e9:.2f}B vs {published / 1e9}B"


def test_longcat2_ngram_tables_and_active_parameters():
    cfg = preset("longcat2")
    counts = count_parameters(cfg)
    assert _rel(counts.by_component["ngram"], 135.0e9) < 1e-3
    # one expert slot across all 38 layers is about 1.91B; about 7 of 12 slots hit FFN experts
    assert _rel(counts.expert_slot_params_per_layer * cfg.num_layers, 1.91e9) < 5e-3
    assert counts.ffn_slots_per_token == 7.0
    assert _rel(counts.active_params, 48e9) < 0.02  # "about 48B active"
    flash = count_parameters(preset("flash"))
    assert _rel(flash.active_params, 27e9) < 0.02  # LongCat-Flash: ~27B active on average


def test_kv_cache_bytes_per_token():
    # LongCat-2.0: 76 sublayers x (512 + 64) latent values + 38 indexer keys of 128, in bf16
    kv = kv_cache_bytes_per_token(preset("longcat2"))
    assert kv["latent"] == 2 * (76 * 576 + 38 * 128) == 97280
    # expanded per-head cache: 76 x 64 heads x (192 key + 128 value)
    assert kv["expanded"] == 2 * 76 * 64 * 320 == 3112960
    flash = kv_cache_bytes_per_token(preset("flash"), dtype_bytes=1)
    assert flash["latent"] == 56 * 576


def _longcat_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("longcat")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "longcat.cli"]


def _run(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([*_longcat_cmd(), *args], capture_output=True, text=True, timeout=60, env=env)
    return proc, time.perf_counter() - start


def test_info_json_for_longcat2():
    proc, _ = _run("info", "longcat2", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # exactly one JSON object, nothing else on stdout
    assert isinstance(info, dict)
    assert set(info["params_by_component"]) == set(COMPONENTS)
    counts = count_parameters(preset("longcat2"))
    assert info["params_by_component"] == counts.by_component
    assert info["total_params"] == counts.total - counts.by_component["mtp"]
    assert _rel(info["total_params"], 1638.6e9) < 1e-3
    assert info["active_params"] == round(counts.active_params)
    assert info["kv_cache_bytes_per_token"] == {"latent_bf16": 97280, "expanded_bf16": 3112960}


def test_info_unknown_preset_is_a_one_line_error():
    proc, _ = _run("info", "longcat9")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "longcat9" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
