"""Serving memory as engines lay it out: KV bytes per engine and dtype, the indexer and MTP caches,
page rounding, the engine's memory fraction and workspace; our own engine against a real LatentCache."""

from __future__ import annotations

import json

import pytest
import torch

from longcat.cli import main
from longcat.config import ConfigError, preset
from longcat.model.cache import LatentCache
from longcat.plan.arch import Architecture, from_longcat, load_architecture
from longcat.plan.engines import engine_names, kv_layout, load_engine
from longcat.plan.hardware import load_hardware
from longcat.plan.serve import ServeSetup, serve_plan

GiB = 2**30


def mla(sparse: bool, layers: int = 4) -> Architecture:
    """A DeepSeek-sized MLA latent (512 + 64) with or without a 128-dim lightning indexer."""
    return Architecture(hidden_size=1024, num_layers=layers, attention="mla", num_heads=8, q_lora_rank=256,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        ffn_hidden_size=2048, index_heads=4 if sparse else 0, index_head_dim=128 if sparse else 0,
                        sparse_topk=2048 if sparse else 0, mtp_layers=1)


def test_catalog_cites_a_source_for_every_choice():
    assert {"sglang", "vllm", "longcat"} <= set(engine_names())
    for name in engine_names():
        engine = load_engine(name)
        for key in ("page_tokens", "mem_fraction", "workspace_in_fraction", "fp8_layout_dense", "fp8_layout_sparse",
                    "indexer_cache", "mtp_cache"):
            assert engine.notes.get(key), f"engine {name}: field {key} has no source note"


def test_flashmla_fp8_cache_is_656_bytes_and_the_indexer_132():
    """FlashMLA's FP8 MLA entry: 512 e4m3 + 4 fp32 tile scales + 64 bf16 rope = 656 bytes; the
    indexer key 128 e4m3 + one fp32 scale = 132; per-tensor FP8 (dense MLA): 576."""
    sglang = load_engine("sglang")
    sparse = kv_layout(mla(True, layers=1), sglang, "fp8")
    assert sparse["latent"] + sparse["rope"] + sparse["scales"] == 656  # one block = 1 attention sublayer here
    assert sparse["indexer"] == 132
    dense = kv_layout(mla(False, layers=1), sglang, "fp8")
    assert dense["total"] == 576
    assert kv_layout(mla(False, layers=1), sglang, "bf16")["total"] == 576 * 2
    # the speculative draft's cache only when asked (engines); one more sublayer in the same layout
    with_mtp = kv_layout(mla(True, layers=1), sglang, "fp8", mtp=True)
    assert with_mtp["mtp"] == 656 and with_mtp["total"] == 656 + 132 + 656
    with pytest.raises(ConfigError, match="use --engine sglang or vllm"):
        kv_layout(mla(True), load_engine("longcat"), "fp8")


@pytest.mark.parametrize("lsa", [True, False])
@pytest.mark.parametrize("mtp", [True, False])
def test_longcat_engine_matches_a_real_latent_cache(lsa, mtp):
    """`--engine longcat` counts exactly what longcat.model.cache.LatentCache allocates."""
    config = preset("tiny", index_n_heads=2 if lsa else 0, mtp_num_layers=1 if mtp else 0)
    arch = from_longcat(config, name="tiny")
    rows, max_len = 3, 40
    for kv_dtype, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cache = LatentCache(config, rows, max_len, dtype=dtype, with_mtp=mtp)
        planned = kv_layout(arch, load_engine("longcat"), kv_dtype, mtp=mtp)
        assert planned["total"] * rows * max_len == cache.nbytes()
        assert (planned["indexer"] > 0) == lsa and (planned["mtp"] > 0) == mtp


def test_serve_plan_engine_memory_rules():
    arch, hw = load_architecture("longcat2"), load_hardware("h200")
    common = dict(chips=64, tp=8, kv_dtype="fp8", weights_dtype="fp8", context=100_000)
    sg = serve_plan(ServeSetup(arch, hw, engine="sglang", **common))
    vl = serve_plan(ServeSetup(arch, hw, engine="vllm", **common))
    # LongCat LSA is sparse MLA: both engines run FlashMLA's sparse FP8 layout
    assert sg["kv_bytes_per_token"] == vl["kv_bytes_per_token"] == 76 * 656 + 38 * 132
    # SGLang's static fraction holds weights and KV only; vLLM's also the workspace and runtime
    assert sg["usable_gib_per_device"] == pytest.approx(0.88 * hw.hbm_gib)
    assert vl["usable_gib_per_device"] == pytest.approx(0.9 * hw.hbm_gib - vl["runtime_reserved_gib"])
    assert vl["free_gib_per_device"] == pytest.approx(vl["usable_gib_per_device"] - vl["weights_gib_per_device"]
                                                      - vl["workspace_gib_per_device"]["total"])
    # whole pages: capacity is a multiple of 64 tokens; a 100,000-token request takes 1,563 pages
    assert sg["max_context_tokens_per_group"] % 64 == 0
    assert sg["requests_at_context_per_group"] == sg["max_context_tokens_per_group"] // (1563 * 64)
    # a bigger prefill chunk needs more workspace; past the rest of HBM SGLang's plan does not fit
    big = serve_plan(ServeSetup(arch, hw, engine="sglang", prefill_chunk=1 << 20, **common))
    assert not big["fits"] and "--prefill-chunk" in big["problems"][0]
    # our engine: one max_len row per request, cache in the model's dtype, MTP rows always
    own = serve_plan(ServeSetup(arch, hw, engine="longcat", **{**common, "kv_dtype": "bf16"}))
    assert own["page_tokens"] == 0 and own["mtp_cache"]
    assert own["requests_at_context_per_group"] == own["max_context_tokens_per_group"] // 100_000


def test_cli_engine_choice(capsys):
    assert main(["plan", "serve", "--model", "deepseek-v3", "--hardware", "h200", "--chips", "16", "--engine", "vllm",
                 "--kv-dtype", "fp8", "--weights-dtype", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["engine"] == "vllm" and data["kv_bytes_per_token"] == 61 * 576
    assert main(["plan", "serve", "--model", "tiny", "--hardware", "cpu-local", "--chips", "1", "--engine", "nope"]) == 2
    assert "unknown serving engine 'nope'" in capsys.readouterr().err
    assert main(["plan", "serve", "--model", "tiny", "--hardware", "cpu-local", "--chips", "1", "--engine", "longcat",
                 "--kv-dtype", "fp8"]) == 2
    assert "use --engine sglang or vllm" in capsys.readouterr().err


def test_engine_file_errors_name_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCAT_CONFIG_DIR", str(tmp_path))
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "mine.toml").write_text('name = "mine"\npage_tokens = "64"\n')
    with pytest.raises(ConfigError, match="engine field 'page_tokens' must be int"):
        load_engine("mine")
    (tmp_path / "engines" / "mine.toml").write_text('name = "mine"\npage_size = 64\n')
    with pytest.raises(ConfigError, match="unknown engine field"):
        load_engine("mine")
    (tmp_path / "engines" / "mine.toml").write_text('name = "mine"\npage_tokens = 16\nfp8_layout_sparse = "per-tensor"\n')
    assert load_engine("mine").page_tokens == 16 and "mine" in engine_names()  # a user entry works like a packaged one


def test_bench_plan_reports_the_kv_bytes_of_a_real_cache():
    from longcat.bench.plan_bench import PlanSetup, kv_cache_check

    check = kv_cache_check(PlanSetup(preset="tiny", seq_len=32))
    assert check["measured_bytes_per_token"] > 0 and check["error"] == 0.0
