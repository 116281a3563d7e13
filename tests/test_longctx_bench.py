"""`longcat bench longctx` at a small context: the JSON fields, cache vs planner, the curve."""

from __future__ import annotations

import json

import pytest
import torch

from longcat.bench.longctx_bench import auto_chunk, lsa_fidelity
from longcat.cli import main
from longcat.config import preset
from longcat.model import build_model


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_longctx_json(capsys):
    assert main(["bench", "longctx", "--context", "2k", "--new-tokens", "4", "--curve", "512,2k",
                 "--fidelity-max", "512", "--decode-steps", "2", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("context_tokens", "prefill_tokens_per_s", "decode_ms_per_token_16k", "decode_ms_per_token_at_context",
                "cache_bytes", "planner_cache_bytes", "peak_rss_gib", "wall_s"):
        assert r[key] > 0, key
    assert r["peak_rss_source"] in ("VmHWM", "ru_maxrss")  # VmHWM on Linux: this process's own peak
    assert r["context_tokens"] == 2048 and r["reference_context"] == 2048
    assert abs(r["cache_bytes"] / r["planner_cache_bytes"] - 1) < 0.05
    assert [p["context"] for p in r["curve"]] == [512, 2048]
    assert 0 < r["curve"][0]["lsa_fidelity"] <= 1 and "lsa_fidelity" not in r["curve"][1]
    assert all(p["lsa_decode_ms"] > 0 and p["dense_decode_ms"] > 0 for p in r["curve"])


def test_fidelity_counts_the_selected_share():
    model = build_model(preset("tiny")).eval()
    # a context LSA keeps whole: no selection, nothing to measure
    assert lsa_fidelity(model, model.config.index_topk, chunk=64) is None
    share = lsa_fidelity(model, 200, chunk=64)
    # random weights attend almost uniformly: the 24 kept of 201 tokens hold about 24/201 of the mass
    assert 0.5 * 24 / 201 < share < 1.0


def test_bad_input_and_auto_chunk(capsys):
    assert main(["bench", "longctx", "--context", "1q"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert main(["bench", "longctx", "--context", "4k", "--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err
    cfg = preset("tiny")
    assert auto_chunk(cfg, 4096) == 512 and auto_chunk(cfg, 1 << 20) < auto_chunk(cfg, 1 << 16)


def test_curve_in_cpu_time(capsys):
    assert main(["bench", "longctx", "--curve-only", "--context", "1k", "--curve", "512,1k", "--fidelity-max", "0",
                 "--decode-steps", "1", "--threads", "1", "--clock", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["curve_clock"] == "cpu" and "prefill_tokens_per_s" not in r
    assert [p["context"] for p in r["curve"]] == [512, 1024]
    assert all(p["lsa_decode_ms"] > 0 and p["dense_decode_ms"] > 0 for p in r["curve"])
    with pytest.raises(SystemExit):
        main(["bench", "longctx", "--clock", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
