"""What the engines do, modelled as mechanisms: node-limited routing, FP8 dispatch, the schedule that
hides the expert all-to-all, recompute of norms and MLA up-projections, FP8 activation caching,
optimizer-state and EMA formats; and the published-runs validation table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from longcat.catalog import catalog_dir
from longcat.cli import main
from longcat.config import ConfigError
from longcat.plan.arch import load_architecture
from longcat.plan.hardware import load_hardware, load_stack
from longcat.plan.layout import Layout, parse_layout
from longcat.plan.train import Planner, TrainSetup
from longcat.plan.validate import published_rows

GiB = 2**30
DEEPSEEK = dict(tp=1, pp=16, ep=64, dp_shard=128, dp_replicate=1, zero=1, microbatch=1)


def deepseek(stack="deepseek-v3", precision="fp8", **arch_changes) -> Planner:
    arch = dataclasses.replace(load_architecture("deepseek-v3"), **arch_changes)
    return Planner(TrainSetup(arch, load_hardware("h800"), load_stack(stack), 2048, 4096, 15360 * 4096,
                              precision=precision))


def test_node_limited_routing_and_fp8_dispatch():
    p = deepseek()
    H = 7168
    dispatch, combine = p._a2a_rows()
    assert dispatch == pytest.approx(H * (1 + 4 / 128)) and combine == 2 * H  # e4m3 + 1x128 scales; bf16
    assert deepseek(precision="bf16")._a2a_rows() == (2 * H, 2 * H)
    limited = p._a2a_time(4096, combine, 64, 1)
    free = deepseek(route_max_nodes=0)._a2a_time(4096, combine, 64, 1)
    # 8 nodes of 8: without a limit 8 * 56/64 = 7 rows per token cross the network; with M = 4 and
    # one send per node, 4 * 7/8 = 3.5 rows
    hw = p.s.hw
    nic = hw.scaleout_bandwidth_gbs * hw.scaleout_efficiency * 1e9
    latency = hw.collective_latency_us * 1e-6
    assert limited == pytest.approx(4096 * 3.5 * combine / nic + latency)
    assert free == pytest.approx(4096 * 7 * combine / nic + latency)


def test_ep_schedule_hides_the_all_to_all_by_mechanism():
    p = deepseek()
    times = {s: p._layer_time(True, Layout(**DEEPSEEK, recompute="none", ep_schedule=s)) for s in ("none", "dualbatch")}
    assert times["dualbatch"]["ep_comm"] < times["none"]["ep_comm"]
    assert times["dualbatch"]["overhead"] == pytest.approx(2 * times["none"]["overhead"])  # each half launches its kernels
    assert any("shortcut MoE" in e for e in p.check(Layout(**DEEPSEEK, ep_schedule="shortcut")))
    flash = Planner(TrainSetup(load_architecture("flash"), load_hardware("h800"), load_stack("modern"), 512, 4096, 4096 * 512))
    L = dict(tp=1, pp=1, ep=64, dp_shard=512, zero=1, microbatch=1, recompute="none")
    none, shortcut = (flash._layer_time(True, Layout(**L, ep_schedule=s))["ep_comm"] for s in ("none", "shortcut"))
    assert shortcut < none
    # the layout string carries the choice and parses back
    text = str(Layout(**DEEPSEEK, ep_schedule="dualbatch"))
    assert text.endswith(",ep_schedule=dualbatch") and parse_layout(text)["ep_schedule"] == "dualbatch"
    with pytest.raises(ConfigError, match="ep_schedule must be one of none, dualbatch, shortcut"):
        parse_layout("ep_schedule=always")
    with pytest.raises(ConfigError, match="--layout ep_schedule"):
        load_stack("modern", {"ep_overlap": 1.0})


def test_recompute_norm_up_and_fp8_activations():
    p = deepseek()
    plans = {r: p.evaluate(Layout(**DEEPSEEK, recompute=r, ep_schedule="dualbatch")) for r in ("none", "norm_up", "full")}
    act = {r: plans[r].memory["activations"] + plans[r].memory["pipeline_inflight"] for r in plans}
    assert act["full"] < act["norm_up"] < act["none"]
    # norm_up executes the MLA up-projections again: 2 FLOPs per parameter per token
    a = p.s.arch
    up = a.num_layers * a.num_heads * (a.q_lora_rank * a.qk_dim + a.kv_lora_rank * (a.qk_nope_head_dim + a.v_head_dim))
    assert plans["norm_up"].hw_flops_per_token - plans["none"].hw_flops_per_token == pytest.approx(2 * up)
    # FP8 activation caching shrinks what is kept, and only in an FP8 run
    modern = deepseek(stack="modern").evaluate(Layout(**DEEPSEEK, recompute="none", ep_schedule="dualbatch"))
    assert plans["none"].memory["activations"] < 0.8 * modern.memory["activations"]
    t_bf16 = deepseek(precision="bf16").s.arch.layer_tensors(True, 4096, flash=True, fp8_cache=False)
    t_fp8 = deepseek().s.arch.layer_tensors(True, 4096, flash=True, fp8_cache=True)
    assert sum(t_fp8.saved.values()) < sum(t_bf16.saved.values())
    assert sum(t_fp8.traffic.values()) == sum(t_bf16.traffic.values())  # the same kernels run


def test_optimizer_state_and_ema_formats():
    layout = Layout(**DEEPSEEK, recompute="full", ep_schedule="dualbatch")
    # fp32 master (4) + two moments: 12 bytes per parameter with fp32 moments, 8 with bf16 ones
    assert deepseek(stack="modern")._state_bytes() == (2.0, 4.0, 12.0)
    assert deepseek()._state_bytes() == (2.0, 4.0, 8.0)
    ds = deepseek().evaluate(layout)  # EMA offloaded to the host
    assert ds.memory["ema"] == 0.0
    on_device = Planner(dataclasses.replace(deepseek().s, stack=dataclasses.replace(load_stack("deepseek-v3"), ema_offload=False)))
    kept = on_device.evaluate(layout).memory
    assert kept["ema"] == pytest.approx(kept["optimizer"] / 8 * 4)  # fp32, sharded like the optimizer state


def test_published_runs_table(capsys):
    rows = published_rows(catalog_dir("validation") / "published_runs.toml", free_search=False)
    assert len(rows) >= 6
    for row in rows:
        assert row["source"] and row["published"] > 0
        assert row["error"] == pytest.approx(row["predicted"] / row["published"] - 1)
    names = {r["name"] for r in rows}
    assert any("DeepSeek-V3" in n for n in names) and any("Llama 3" in n for n in names)
    # `plan validate` runs every table and prints each row's error
    assert main(["plan", "validate", "--no-search", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"megatron_2021_table1.toml", "published_runs.toml"} <= set(data)
    assert all("error" in r for rows in data.values() for r in rows)


def test_gemm_library_cache_is_measured_and_planned():
    """The GEMM library keeps a kernel per shape: measured (growth per shape, plateau) by running
    new shapes, and planned as min(plateau, shapes a step runs x growth per shape)."""
    import torch

    from longcat.plan.calibrate import library_cache

    plateau, per_shape = library_cache(torch, shapes=40, every=20)
    assert plateau >= 0 and per_shape >= 0
    hw = load_hardware("cpu-local", {"library_cache_gib": 0.5, "library_cache_per_shape_mib": 2.0})
    dense = load_architecture("llama3-405b")
    moe = load_architecture("small")
    for arch, saturated in ((dense, False), (moe, True)):
        p = Planner(TrainSetup(arch, hw, load_stack("pytorch-eager"), 1, 256, 256 * 4, precision="autocast"))
        plan = p.evaluate(Layout(microbatch=4, zero=0, dp=1))
        expected = 0.5 * GiB if saturated else p.gemm_shapes * 2.0 * 2**20
        assert plan.memory["library"] == pytest.approx(expected)
    # 2 kernels (gate_up, down) per routed expert and MoE block, each its own row count
    assert p.gemm_shapes >= 2 * moe.n_routed_experts * moe.moe_layers
    assert Planner(TrainSetup(dense, load_hardware("h100"), load_stack("modern"), 8, 256, 256 * 8)).evaluate(
        Layout(dp=8, zero=1)).memory["library"] == 0.0  # GPU entries: counted in reserved_gib
