"""`longcat plan ...` on the command line: JSON keys, defaults, user errors."""

from __future__ import annotations

import json

import pytest

from longcat.cli import main

TRAIN_KEYS = {"layout", "parallel", "runtime", "fits", "memory_gib", "step_time_s", "tokens_per_s", "tokens_per_day", "days",
              "tflops_per_device", "hw_tflops_per_device", "mfu", "mfu_noncausal"}


def run_json(capsys, *argv: str):
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_train_search_json(capsys):
    code, data = run_json(capsys, "plan", "train", "--model", "flash", "--hardware", "h800", "--chips", "512",
                          "--seq-len", "4096", "--tokens", "20T", "--top", "3", "--json")
    assert code == 0
    assert data["global_batch_tokens_requested"] == 4 * 2**20  # the default: 4Mi tokens
    assert 1 <= len(data["layouts"]) <= 3
    for layout in data["layouts"]:
        assert TRAIN_KEYS <= set(layout)
        assert "total" in layout["memory_gib"]
        assert layout["days"] == pytest.approx(20e12 / layout["tokens_per_day"])


def test_train_fixed_layout_json(capsys):
    code, data = run_json(capsys, "plan", "train", "--model", "gpt3-175b", "--hardware", "a100-80gb", "--chips", "1024",
                          "--seq-len", "2048", "--global-batch-tokens", str(1536 * 2048),
                          "--layout", "dp_shard=16,dp_replicate=1,ep=1,tp=8,cp=1,pp=8,pp_schedule=interleaved,"
                          "pp_stages_per_rank=2,zero=1,recompute=full,microbatch=1", "--json")
    assert code == 0
    assert TRAIN_KEYS <= set(data)
    # 1536 sequences over 16 data ranks: 96 micro-batches of one sequence
    assert data["parallel"] == ("dp_replicate=1,dp_shard=16,ep=1,tp=8,cp=1,pp=8,pp_schedule=interleaved,"
                                "pp_microbatches=96,pp_stages_per_rank=2")
    assert data["layout"] == data["parallel"] + ",zero=1,recompute=full,microbatch=1"
    assert {d.split(":")[0] for d in data["runtime"]["differs"]} >= {"zero=1", "recompute=full"}
    # the older spelling names the same layout
    code, old = run_json(capsys, "plan", "train", "--model", "gpt3-175b", "--hardware", "a100-80gb", "--chips", "1024",
                         "--seq-len", "2048", "--global-batch-tokens", str(1536 * 2048),
                         "--layout", "tp=8,pp=8,ep=1,cp=1,dp=16,zero=1,recompute=full,microbatch=1,schedule=interleaved:2",
                         "--json")
    assert old["layout"] == data["layout"] and old["step_time_s"] == data["step_time_s"]
    # full recomputation: hardware FLOPs exceed model FLOPs by about a third of the layer work
    assert 1.2 < data["hw_tflops_per_device"] / data["tflops_per_device"] < 1.4
    assert data["mfu_noncausal"] > data["mfu"]


def test_serve_json(capsys):
    code, data = run_json(capsys, "plan", "serve", "--model", "longcat2", "--hardware", "h200", "--chips", "64", "--json")
    assert code == 0
    assert {"weights_gib_per_device", "kv_bytes_per_token", "max_context_tokens", "chips_for_context", "parallel"} <= set(data)
    # experts over all 64 chips spans the TP ranks, which the runtime's ep (taken from dp_shard) cannot
    assert data["parallel"] is None and data["parallel_rejected"]
    assert data["chips_for_context"] >= 8


def test_user_errors_are_one_line(capsys):
    assert main(["plan", "train", "--model", "flash", "--hardware", "h100", "--chips", "64", "--layout", "tp=3"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert main(["plan", "train", "--model", "flash", "--hardware", "nope", "--chips", "8"]) == 2
    assert "unknown hardware 'nope'" in capsys.readouterr().err


def test_text_output_names_the_denominator(capsys):
    code = main(["plan", "train", "--model", "llama3-405b", "--hardware", "h100", "--chips", "2048", "--tokens", "1T", "--top", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "MFU" in out and "denominator BF16 dense peak" in out and "days" in out and "Young/Daly" in out
    # the pick balances 126 layers over uneven stages, which the runtime does not do: said, no command given
    assert "the runtime cannot run this layout" in out and "run it:" not in out
    code = main(["plan", "train", "--model", "tiny", "--hardware", "cpu-local", "--chips", "4", "--seq-len", "32",
                 "--global-batch-tokens", "512", "--runnable"])
    out = capsys.readouterr().out
    assert code == 0 and "run it: longcat train --preset tiny --nproc 4 --parallel dp_replicate=1,dp_shard=4" in out
