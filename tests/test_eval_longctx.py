"""`longcat eval longctx` on a tiny trained run: JSON, heatmaps, the chunked perplexity path, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longcat.cli import main
from longcat.config import preset
from longcat.eval.longctx import check_positions, memory_estimate, parse_length, window_losses
from longcat.errors import UserError
from longcat.model import build_model


@pytest.fixture(scope="module")
def run_dir(tiny_jsonl_run) -> tuple[Path, Path]:
    return tiny_jsonl_run


def test_eval_longctx_json_and_heatmaps(run_dir, tmp_path, capsys):
    run, corpus = run_dir
    out = tmp_path / "eval"
    assert main(["eval", "longctx", "--model", str(run), "--data", str(corpus), "--tasks", "passkey,vt",
                 "--lengths", "600,900", "--depths", "0,1", "--samples", "2", "--prefill-chunk", "128", "--ppl-windows", "2",
                 "--threads", "1", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["accuracy"]) == {"passkey", "vt"}
    for task in ("passkey", "vt"):
        assert set(result["accuracy"][task]) == {"600", "900"}
        for by_depth in result["accuracy"][task].values():
            assert set(by_depth) == {"0", "1"} and all(a in (0.0, 0.5, 1.0) for a in by_depth.values())
        assert (out / f"heatmap_{task}.png").stat().st_size > 1000
    assert [p["context"] for p in result["perplexity"]] == [600, 900]
    assert all(p["ppl"] > 1 and p["tail_ppl"] > 1 and p["bpb"] > 0 and p["windows"] == 2 for p in result["perplexity"])
    assert result["setup"]["attention"] == "LSA top-24"
    assert json.loads((out / "longctx.json").read_text())["task_accuracy"] == result["task_accuracy"]


def test_chunked_losses_match_the_full_forward():
    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    tokens = torch.randint(3, 500, (300,))
    chunked = window_losses(model, tokens, chunk=64)  # LSA over the latent cache, 5 chunks
    with torch.no_grad():
        logits = model(tokens[:-1].unsqueeze(0), mtp=False, indexer_loss=False).logits[0]
    full = F.cross_entropy(logits.float(), tokens[1:], reduction="none")
    torch.testing.assert_close(chunked, full, atol=2e-4, rtol=1e-4)


def test_bad_input(run_dir, capsys, monkeypatch):
    run, corpus = run_dir

    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    base = ["eval", "longctx", "--model", str(run), "--data", str(corpus), "--tasks", "passkey", "--depths", "0.5"]
    err = error([*base, "--lengths", "4k"])
    assert "max_position_embeddings (1,024; YaRN factor 4" in err and "--stage yarn" in err
    assert "not a number" in error([*base, "--lengths", "4q"])
    assert "choose from" in error([*base[:-4], "--tasks", "nope", "--lengths", "600"])
    assert "--depths" in error([*base[:-2], "--depths", "2", "--lengths", "600"])

    import psutil

    class Tight:
        available = 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    err = error([*base, "--lengths", "600"])
    assert "need about" in err and "GiB are available" in err


def test_helpers():
    assert parse_length("16k") == 16384 and parse_length("1m") == 1 << 20 and parse_length("512") == 512
    cfg = preset("tiny", yarn_factor=1.0, max_position_embeddings=512)
    with pytest.raises(UserError, match="no YaRN"):
        check_positions(cfg, 1000)
    small = memory_estimate(cfg, 1024, batch=1, prefill_chunk=256)
    big = memory_estimate(cfg, 4096, batch=1, prefill_chunk=256)
    assert big["cache_bytes"] == 4 * small["cache_bytes"] and big["prefill_bytes"] == 4 * small["prefill_bytes"]


def test_perplexity_only_up_to_the_models_positions(run_dir, capsys):
    run, corpus = run_dir
    # 1,024 is every position the tiny model has: no room for a retrieval answer, enough for perplexity
    assert main(["eval", "longctx", "--model", str(run), "--data", str(corpus), "--tasks", "none",
                 "--lengths", "1k", "--ppl-windows", "1", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == {} and result["perplexity"][0]["context"] == 1024
    assert main(["eval", "longctx", "--model", str(run), "--data", str(corpus), "--tasks", "passkey",
                 "--lengths", "1k", "--depths", "0"]) == 2
    assert "generated exceed the model's max_position_embeddings" in capsys.readouterr().err


def test_bits_per_byte_of_a_length_do_not_depend_on_the_other_lengths(run_dir, capsys):
    """bits/byte come from the predicted windows' own bytes: asking for a longer length too (which
    reads more held-out text) leaves the shorter one's figure unchanged."""
    run, corpus = run_dir
    figures = []
    for lengths in ("300", "300,900"):
        assert main(["eval", "longctx", "--model", str(run), "--data", str(corpus), "--tasks", "none",
                     "--lengths", lengths, "--ppl-windows", "2", "--threads", "1", "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out)["perplexity"][0])
    assert figures[0]["context"] == figures[1]["context"] == 300
    assert figures[0]["bpb"] == figures[1]["bpb"] and figures[0]["bpb"] > 0
