"""Cluster planner: architecture accounting, formulas, memory, search, serving, hardware catalog,
and the Megatron-LM 2021 validation table (±15%)."""

from __future__ import annotations

import json
import math
import tomllib

import pytest

from longcat.config import ConfigError, preset
from longcat.model.count import count_parameters, kv_cache_bytes_per_token
from longcat.plan.arch import Architecture, from_longcat, load_architecture
from longcat.plan.hardware import hardware_names, load_hardware, load_stack
from longcat.plan.layout import Layout, parse_layout
from longcat.plan.serve import ServeSetup, chips_for_context, serve_plan
from longcat.plan.train import Planner, TrainSetup, ring_bytes, search

GiB = 2**30


def gpt(h=2304, layers=24, heads=24, vocab=51200, seq=2048, dropout=True) -> Architecture:
    return Architecture(vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads, mlp="gelu",
                        ffn_hidden_size=4 * h, norm="layernorm", bias=True, dropout=dropout,
                        tied_embeddings=True, learned_positions=seq)


def planner(arch, hw="a100-80gb", stack="modern", chips=64, seq=2048, batch_seqs=512, **kw) -> Planner:
    return Planner(TrainSetup(arch, load_hardware(hw), load_stack(stack), chips, seq, batch_seqs * seq, **kw))


# --- architectures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "small", "flash", "flash-lite", "longcat2"])
def test_longcat_presets_convert_exactly(name):
    config = preset(name)
    arch = from_longcat(config, name)
    counts = count_parameters(config)
    assert sum(arch.param_counts().values()) == counts.total
    assert arch.active_params == pytest.approx(counts.active_params, rel=1e-12)
    assert arch.kv_bytes_per_token(2) == kv_cache_bytes_per_token(config, 2)["latent"]


@pytest.mark.parametrize("file, preset_name", [("longcat-flash", "flash"), ("longcat-2.0", "longcat2")])
def test_longcat_example_files_match_presets(file, preset_name):
    from_file = load_architecture(file).to_dict()
    from_preset = from_longcat(preset(preset_name)).to_dict()
    for key in ("name", "source"):
        from_file.pop(key), from_preset.pop(key)
    assert from_file == from_preset


@pytest.mark.parametrize("name, total_b, active_b", [
    ("gpt3-175b", 174.6, 174.6), ("llama3-405b", 405.9, 405.9), ("deepseek-v3", 671.0, 37.6),
    ("deepseek-v2", 235.7, 21.4), ("deepseek-67b", 67.4, 67.4),  # published: 236B (21B active), 67B
])
def test_published_model_sizes(name, total_b, active_b):
    arch = load_architecture(name)
    assert arch.total_params / 1e9 == pytest.approx(total_b, abs=0.1)
    assert arch.active_params / 1e9 == pytest.approx(active_b, abs=0.1)


def test_unknown_model_and_field_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a LongCat preset"):
        load_architecture("no-such-model")
    bad = tmp_path / "bad.toml"
    bad.write_text('[arch]\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nhiden = 3\n')
    with pytest.raises(ConfigError, match="hiden"):
        load_architecture(str(bad))


def test_korthikanti_activation_bytes():
    """34*h + 5*a*s per token and layer (no TP); 10*h + 24*h/t + 5*a*s/t with TP, /t with SP."""
    h, a, s, t = 2304, 24, 2048, 4
    arch = gpt(h=h, heads=a, seq=s)
    tensors = arch.layer_tensors(False, s, flash=False)
    # the planner adds 4*a bytes of softmax statistics to the attention output; Korthikanti omits them
    saved = sum(tensors.saved.values()) - 4 * a
    assert saved == 34 * h + 5 * a * s
    no_sp = planner(arch, stack="megatron-2021")._layer(False, t, 1, 1)
    assert no_sp["saved"] - s * 4 * a / t == pytest.approx(s * (10 * h + 24 * h / t + 5 * a * s / t))
    with_sp = load_stack("megatron-2021", {"sequence_parallel": True})
    p = Planner(TrainSetup(arch, load_hardware("a100-80gb"), with_sp, 64, s, 512 * s))
    assert p._layer(False, t, 1, 1)["saved"] - s * 4 * a / t == pytest.approx(s * (34 * h + 5 * a * s) / t)


def test_megatron_flops_formula():
    """Hardware FLOPs with full recomputation and non-causal attention = 96 B s l h^2 (1 + s/6h + V/16lh)."""
    h, l, s, V = 3072, 30, 2048, 51200
    p = planner(gpt(h=h, layers=l, heads=32, vocab=V), stack="megatron-2021")
    plan = p.evaluate(Layout(tp=2, pp=1, dp=32, zero=0, recompute="full", microbatch=1))
    per_token = 96 * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert plan.hw_flops_per_token == pytest.approx(per_token, rel=1e-12)
    # model FLOPs: 3 passes instead of 4, causal attention halves the s/6h term
    causal = 72 * l * h * h * (1 + (s + 1) / 2 / (6 * h) + V / (12 * l * h))
    assert plan.model_flops_per_token == pytest.approx(causal, rel=1e-12)


def test_sparse_attention_caps_the_context():
    arch = load_architecture("longcat2")
    short = arch.attention_core_flops(2048, causal=True)
    long = arch.attention_core_flops(131072, causal=True)
    dense = Architecture(**{**arch.to_dict(), "sparse_topk": 0, "index_heads": 0})
    # the main attention stops growing at the budget; only the indexer (~10% of dense) keeps scaling
    assert long < dense.attention_core_flops(131072, causal=True) / 5
    assert long > short
    assert Architecture.mean_context(4096, 2048, causal=True) == pytest.approx((2048 * 2049 / 2 + 2048 * 2048) / 4096)


# --- formulas -----------------------------------------------------------------------------------------


def test_ring_collectives():
    assert ring_bytes("all_reduce", 8, 1000) == pytest.approx(2 * 7 / 8 * 1000)
    assert ring_bytes("all_gather", 4, 1000) == pytest.approx(3 / 4 * 1000)
    assert ring_bytes("all_reduce", 1, 1000) == 0


@pytest.mark.parametrize("schedule, vpp", [("1f1b", 1), ("interleaved", 2), ("interleaved", 4)])
def test_pipeline_bubble(schedule, vpp):
    p = planner(gpt(h=4096, layers=32, heads=32), stack="megatron-2021", chips=64, batch_seqs=64)
    plan = p.evaluate(Layout(tp=8, pp=4, dp=2, zero=0, recompute="full", microbatch=1, schedule=schedule, vpp=vpp))
    m = plan.microbatches
    per_microbatch = sum(v for k, v in plan.step.items() if k not in ("pipeline_bubble", "dp_comm", "optimizer")) / m
    assert plan.step["pipeline_bubble"] == pytest.approx((4 - 1) / vpp * per_microbatch)


def test_memory_responds_to_zero_recompute_and_optimizer():
    p = planner(gpt(h=4096, layers=32, heads=32, dropout=False), hw="h100", chips=64, seq=4096, batch_seqs=256)
    base = dict(tp=4, pp=2, dp=8, microbatch=1)
    mem = {z: p.evaluate(Layout(**base, zero=z)).memory_gib for z in (0, 1, 2, 3)}
    assert mem[1]["optimizer"] == pytest.approx(mem[0]["optimizer"] / 8)
    assert mem[2]["gradients"] == pytest.approx(mem[1]["gradients"] / 8)
    assert mem[3]["weights"] == pytest.approx(mem[2]["weights"] / 8)
    none = p.evaluate(Layout(**base, recompute="none")).memory_gib["activations"]
    full = p.evaluate(Layout(**base, recompute="full")).memory_gib["activations"]
    assert full < none / 4
    muon = planner(gpt(h=4096, layers=32, heads=32), hw="h100", chips=64, optimizer="muon").evaluate(Layout(**base, zero=0))
    adam = planner(gpt(h=4096, layers=32, heads=32), hw="h100", chips=64).evaluate(Layout(**base, zero=0))
    assert muon.memory_gib["optimizer"] < adam.memory_gib["optimizer"]
    plan = p.evaluate(Layout(**base))
    assert plan.fits == (plan.memory_gib["total"] <= 79.6)
    assert set(plan.memory) == {"weights", "gradients", "optimizer", "ema", "library", "activations", "pipeline_inflight", "logits",
                                "comm_buffers", "reserved", "allocator"}


def test_young_daly_interval_and_goodput():
    arch = load_architecture("flash")
    small = planner(arch, hw="h800", chips=1024, seq=4096, batch_seqs=2048, tokens=1e12)
    big = planner(arch, hw="h800", chips=8192, seq=4096, batch_seqs=8192, tokens=1e12)
    a, b = search(small, top=1)[0], search(big, top=1)[0]
    delta = a.checkpoint["write_s"]
    mtbf = a.reliability["job_mtbf_hours"] * 3600
    assert a.reliability["checkpoint_interval_min"] * 60 == pytest.approx(math.sqrt(2 * delta * mtbf), rel=0.1)
    assert 0 < b.reliability["goodput"] < a.reliability["goodput"] < 1


# --- validation ---------------------------------------------------------------------------------------


def test_megatron_2021_table_within_15_percent():
    from longcat.plan.validate import megatron_rows

    rows = megatron_rows(free_search=False)  # the table shipped in the package
    assert len(rows) == 10
    for row in rows:
        assert row["fits"], row
        assert abs(row["error"]) <= 0.15, f"{row['params_b']}B: predicted {row['predicted_tflops']:.1f} vs {row['published_tflops']}"
        assert row["params_b_counted"] == pytest.approx(row["params_b"], rel=0.05)  # the paper rounds


# --- search ---------------------------------------------------------------------------------------------


def test_headline_search_longcat2_on_50000_ascend_910c():
    p = Planner(TrainSetup(load_architecture("longcat2"), load_hardware("ascend-910c"), load_stack("modern"),
                           50000, 8192, 8192 * 6250, 35e12))
    plans = search(p, top=3)
    best = plans[0]
    assert best.fits and best.chips_used <= 50000
    assert 0.2 < best.mfu < 0.7
    assert 1 < best.days < 100
    assert [x.tokens_per_s for x in plans] == sorted((x.tokens_per_s for x in plans), reverse=True)
    # the fixed fields of a partial layout are kept
    fixed = search(p, parse_layout("tp=8,pp=2"), top=2)
    assert all(x.layout.tp == 8 and x.layout.pp == 2 for x in fixed)


def test_layout_parsing_and_checks():
    assert parse_layout("tp=8,pp=4,schedule=interleaved:2,mbs=2") == {
        "tp": 8, "pp": 4, "pp_schedule": "interleaved", "pp_stages_per_rank": 2, "microbatch": 2}
    for bad in ("tp=x", "foo=1", "recompute=some", "schedule=zigzag", "zero=5", "dp_shard=0", "pp_microbatches=-1"):
        with pytest.raises(ConfigError):
            parse_layout(bad)
    p = planner(gpt(), chips=64)
    assert any("divide" in e for e in p.check(Layout(tp=5, dp=8)))
    assert any("exceeds --chips" in e for e in p.check(Layout(tp=8, dp=16)))
    assert p.evaluate(Layout(tp=5)) is None


# --- serving --------------------------------------------------------------------------------------------


def test_serving_memory_and_context():
    arch = load_architecture("longcat2")
    hw = load_hardware("ascend-910c")
    plan = serve_plan(ServeSetup(arch, hw, chips=64, engine="longcat", mtp=False))
    assert plan["kv_bytes_per_token"] == kv_cache_bytes_per_token(preset("longcat2"), 2)["latent"]
    assert plan["weights_gib_per_device"] * 64 * GiB == pytest.approx(
        sum(arch.param_counts().values()) * 2, rel=0.25)  # dense part replicated over groups
    more = serve_plan(ServeSetup(arch, hw, chips=128))
    assert more["max_context_tokens"] > plan["max_context_tokens"]
    bf16 = chips_for_context(ServeSetup(arch, hw, chips=1), 1 << 20)
    fp8 = chips_for_context(ServeSetup(arch, hw, chips=1, kv_dtype="fp8", weights_dtype="fp8"), 1 << 20)
    assert fp8 <= bf16
    at = serve_plan(ServeSetup(arch, hw, chips=bf16))
    assert at["max_context_tokens"] >= 1 << 20
    assert serve_plan(ServeSetup(arch, hw, chips=bf16 - 8))["max_context_tokens"] < 1 << 20
    # GQA splits KV heads over TP ranks; MLA keeps the whole latent on each rank
    llama = load_architecture("llama3-405b")
    assert llama.kv_bytes_per_token(2, tp=8) == llama.kv_bytes_per_token(2) / 8
    assert arch.kv_bytes_per_token(2, tp=8) == arch.kv_bytes_per_token(2)


# --- hardware -------------------------------------------------------------------------------------------


def test_hardware_catalog_and_overrides(tmp_path):
    names = set(hardware_names())
    assert {"a100-80gb", "h100", "h800", "h200", "h20", "b200", "ascend-910b", "ascend-910c"} <= names
    for name in names:
        hw = load_hardware(name)
        for field in ("peak_tflops_bf16", "hbm_gib", "hbm_bandwidth_gbs", "gemm_efficiency", "scaleup_bandwidth_gbs"):
            assert hw.provenance[field] in ("vendor", "estimated", "measured"), (name, field)
    hw = load_hardware("h100", {"gemm_efficiency": 0.5})
    assert hw.gemm_efficiency == 0.5 and hw.provenance["gemm_efficiency"] == "override"
    with pytest.raises(ConfigError, match="unknown hardware field"):
        load_hardware("h100", {"gemm_eff": 0.5})
    child = tmp_path / "mine.toml"
    child.write_text('inherit = "h100"\n[estimated]\nhbm_gib = 100\n')
    mine = load_hardware(str(child))
    assert mine.hbm_gib == 100 and mine.peak_tflops_bf16 == 989 and mine.provenance["hbm_gib"] == "estimated"
    with pytest.raises(ConfigError, match="unknown hardware"):
        load_hardware("tpu-v9")


def test_calibrate_writes_a_loadable_entry(tmp_path):
    from longcat.plan.calibrate import measure, to_toml

    measured = measure(quick=True, arch=load_architecture("tiny"))
    path = tmp_path / "cpu.toml"
    path.write_text(to_toml(measured, "cpu-test"))
    hw = load_hardware(str(path))
    assert hw.name == "cpu-test" and hw.peak_tflops_bf16 > 0 and hw.hbm_bandwidth_gbs > 0
    assert hw.provenance["peak_tflops_bf16"] == "measured" and hw.provenance["scaleup_domain"] == "estimated"
    assert hw.provenance["memory_efficiency"] == "measured"
    assert hw.cache_elementwise_gbs > 0 and hw.provenance["cache_elementwise_gbs"] == "measured"
    assert 0 < hw.expert_gemm_efficiency <= 1
    assert 0 < hw.masked_attention_efficiency <= 1 and hw.provenance["masked_attention_efficiency"] == "measured"
    assert hw.peak_tflops_fp32 > 0 and hw.provenance["peak_tflops_fp32"] == "measured"


def test_calibration_goes_to_the_user_folder_and_overrides_the_packaged_entry(tmp_path, monkeypatch, capsys):
    from longcat.catalog import catalog_dir
    from longcat.cli import main

    monkeypatch.setenv("LONGCAT_CONFIG_DIR", str(tmp_path))
    packaged = (catalog_dir("hardware") / "cpu-local.toml").read_text()
    assert main(["plan", "calibrate", "--quick", "--name", "cpu-local", "--json"]) == 0
    written = tmp_path / "hardware" / "cpu-local.toml"
    assert json.loads(capsys.readouterr().out)["path"] == str(written)
    assert (catalog_dir("hardware") / "cpu-local.toml").read_text() == packaged  # the package is never written
    assert load_hardware("cpu-local").peak_tflops_bf16 == pytest.approx(tomllib.loads(written.read_text())["measured"]["peak_tflops_bf16"])
