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
    exact = load_stack("pytorch-eager", {"expert_row_buckets": 0})
    layout = Layout(microbatch=4, zero=0, dp=1)
    for arch, stack, saturated in ((dense, "pytorch-eager", False), (moe, exact, True), (moe, "pytorch-eager", False)):
        stack = load_stack(stack) if isinstance(stack, str) else stack
        p = Planner(TrainSetup(arch, hw, stack, 1, 256, 256 * 4, precision="autocast"))
        plan = p.evaluate(layout)
        expected = 0.5 * GiB if saturated else p.library_shapes(layout) * 2.0 * 2**20
        assert plan.memory["library"] == pytest.approx(expected)
    # exact row counts: 2 kernels (gate_up, down) per routed expert and MoE block, each its own row count
    assert Planner(TrainSetup(moe, hw, exact, 1, 256, 1024, precision="autocast")).library_shapes(layout) \
        >= 2 * moe.n_routed_experts * moe.moe_layers
    # bucketed rows: 2 per bucketed size, shared by every expert and block; the fused loss's blocks
    # add the MTP head's partial one (4 x 255 = 1,020 rows: 3 blocks of 256 and one of 252)
    assert p.library_shapes(layout) == p.dense_gemm_shapes + 2 * p.expert_buckets(layout)[1] + 1
    assert Planner(TrainSetup(dense, load_hardware("h100"), load_stack("modern"), 8, 256, 256 * 8)).evaluate(
        Layout(dp=8, zero=1)).memory["library"] == 0.0  # GPU entries: counted in reserved_gib


def _small_planner(hw_changes: dict | None = None, **stack_changes) -> Planner:
    return Planner(TrainSetup(load_architecture("small"), load_hardware("cpu-local", hw_changes),
                              load_stack("pytorch-eager", stack_changes), 1, 256, 256 * 16, precision="autocast"))


def test_fused_loss_holds_blocks_not_logits():
    """The fused chunked cross-entropy (Liger / Cut Cross-Entropy; longcat.model.cross_entropy) keeps
    per head the hidden-state gradient and the fp32 head-weight gradient, plus one block's transient,
    instead of every head's logits: the planner counts exactly that, with the runtime's block size."""
    import torch

    from longcat.model.cross_entropy import BLOCK_BYTES, MIN_BLOCK_ROWS, block_rows_for, linear_cross_entropy

    stack = load_stack("pytorch-eager")  # the cpu-local stack: `longcat train` as it runs
    assert (stack.loss_block_bytes, stack.loss_block_min_rows) == (BLOCK_BYTES, MIN_BLOCK_ROWS)
    fused, unfused = _small_planner(), _small_planner(loss_block_bytes=0)
    layout = Layout(microbatch=16, zero=0, dp=1)
    a = fused.s.arch
    tokens, V, H, heads = 16 * 256, a.vocab_size, a.hidden_size, 1 + a.mtp_layers
    rows = block_rows_for(V)
    assert fused._loss_block_rows(layout) == rows
    expected_fused = heads * (tokens * H * 2 + V * H * 4) + rows * V * 8 + V * H * 8 + tokens * H * 2
    expected_unfused = tokens * V * (6 * heads + 10)  # bf16 logits + fp32 log-probs per head; the backward's
    got_fused, got_unfused = fused.evaluate(layout).memory["logits"], unfused.evaluate(layout).memory["logits"]
    assert got_fused == pytest.approx(expected_fused) and got_unfused == pytest.approx(expected_unfused)
    assert got_fused < got_unfused / 10
    # small blocks: never fewer rows than the floor
    assert _small_planner(loss_block_bytes=4 * 64 * 1000)._loss_block_rows(layout) == 128  # the floor
    # the kept part is what the runtime keeps: its saved tensors after the forward
    hidden = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 50, (300,)))
    kept = sum(t.numel() * t.element_size() for t in loss.grad_fn.saved_tensors)
    assert kept == 300 * 32 * 2 + 50 * 32 * 4


def test_fused_loss_step_time_and_bucketed_expert_rows():
    """Step time: the fused loss runs the loss's forward and backward element-wise passes at once
    (FUSED_LOSS_BYTES_PER_LOGIT) and one op chain per block; bucketed expert rows (CPU) add their zero
    rows' GEMM work and, as longcat.model.moe pads them, few distinct row counts."""
    from longcat.model.moe import bucketed_count
    from longcat.plan.train import FUSED_LOSS_BYTES_PER_LOGIT, UNFUSED_LOSS_BYTES_PER_LOGIT

    memory_rate = {"cache_elementwise_gbs": 0}  # blocks at the element-wise rate through memory
    fused, unfused = _small_planner(memory_rate), _small_planner(memory_rate, loss_block_bytes=0)
    layout = Layout(microbatch=16, zero=0, dp=1)
    a, hw = fused.s.arch, fused.s.hw
    bw = hw.hbm_bandwidth_gbs * 1e9 * hw.memory_efficiency
    logits = (1 + a.mtp_layers) * 16 * 256 * a.vocab_size
    f_last, u_last = fused._extras(layout)[1], unfused._extras(layout)[1]
    assert f_last["memory_bound"] - u_last["memory_bound"] == pytest.approx(
        (FUSED_LOSS_BYTES_PER_LOGIT - 3 * UNFUSED_LOSS_BYTES_PER_LOGIT) * logits / bw)
    assert f_last["overhead"] > u_last["overhead"]  # an op chain per block
    # where the entry knows the rate of element-wise kernels on cache-resident blocks, the blocks run at it
    cached = Planner(dataclasses.replace(fused.s, hw=load_hardware("cpu-local", {"cache_elementwise_gbs": 20.0})))
    assert cached._extras(layout)[1]["memory_bound"] - f_last["memory_bound"] == pytest.approx(
        FUSED_LOSS_BYTES_PER_LOGIT * logits * (1 / 20e9 - 1 / bw))
    # the planner's buckets are the runtime's
    assert all(fused._bucketed(n) == bucketed_count(n) for n in range(1, 5000))
    padding, sizes = fused.expert_buckets(layout)
    # balanced router: 4096 tokens x 8 FFN slots / 128 experts = 256 rows per expert, sigma 16
    assert 0 < padding < 1 / 8 and sizes == len({bucketed_count(n) for n in range(192, 321)})
    exact = _small_planner(expert_row_buckets=0)
    padded_t, exact_t = fused._layer_time(True, layout), exact._layer_time(True, layout)
    q = fused._layer(True, 1, 1, 16)
    assert padded_t["compute"] - exact_t["compute"] == pytest.approx(3 * q["t_expert"] * padding)
    assert exact_t["compute"] < padded_t["compute"]


def test_calibration_measures_the_training_runtime_without_changing_the_process():
    import torch

    from longcat.plan.calibrate import training_runtime_rss

    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    assert training_runtime_rss(torch) > 0
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before


def test_lsa_training_on_a_runtime_without_a_sparse_kernel():
    """`longcat train` runs LSA as dense SDPA under the keep-mask (every key computed), with fp32
    indexer products and (query, key)-sized selection tensors: the eager stack plans that, a stack
    with a sparse kernel plans the top-k budget."""
    arch = load_architecture("tiny")
    assert arch.index_heads and arch.sparse_topk == 24
    a, S = arch, 256
    lsa = arch.lsa_dense_runtime(S)
    per_key = 2 * a.num_heads * (a.qk_dim + a.v_dim)
    assert lsa["masked_flops"] == a.attn_per_layer * per_key * S and lsa["causal_flops"] == 0
    short = arch.lsa_dense_runtime(16)  # no query sees more than top-k keys: causal SDPA, no mask
    assert short["masked_flops"] == 0 and short["causal_flops"] == a.attn_per_layer * per_key * 17 / 2
    assert lsa["index_flops"] == 2 * S * a.index_heads * (a.index_head_dim + 1)
    assert lsa["target_flops"] == 2 * S * a.num_heads * (a.kv_lora_rank + a.qk_rope_head_dim)
    assert dataclasses.replace(arch, index_heads=0).lsa_dense_runtime(S) == dict.fromkeys(lsa, 0.0)

    def planner(hw_changes=None, **stack_changes):
        return Planner(TrainSetup(arch, load_hardware("cpu-local", hw_changes), load_stack("pytorch-eager", stack_changes),
                                  1, S, S * 16, precision="autocast"))

    dense, sparse = planner(), planner(sparse_attention_kernel=True)
    q_dense, q_sparse = dense._layer(True, 1, 1, 16), sparse._layer(True, 1, 1, 16)
    hw = dense.s.hw
    tokens = 16 * S
    masked_t = lsa["masked_flops"] * tokens / (hw.peak_tflops_bf16 * 1e12 * hw.masked_attention_efficiency)
    assert q_dense["t_core"] == pytest.approx(masked_t) and masked_t > 5 * q_sparse["t_core"]
    assert q_dense["fwd"] - q_dense["t_core"] > q_sparse["fwd"] - q_sparse["t_core"]  # selection and KL work
    assert q_dense["saved"] - q_sparse["saved"] == pytest.approx(lsa["saved"] * tokens)
    # the MTP block has no indexer: dense causal attention either way
    assert dense._layer(True, 1, 1, 16, True)["t_core"] > sparse._layer(True, 1, 1, 16, True)["t_core"]
    # the masked kernel's rate is its own field (0 in an entry = the causal rate)
    slow = planner({"masked_attention_efficiency": hw.masked_attention_efficiency / 2})._layer(True, 1, 1, 16)
    assert slow["t_core"] - q_dense["t_core"] == pytest.approx(masked_t)
    assert load_hardware("h100").masked_attention_efficiency == load_hardware("h100").attention_efficiency
