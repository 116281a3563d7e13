"""`longcat bench memory` on the tiny preset: real launches of 1 and 2 gloo ranks for both phases
(the model written to disk first, then loaded sharded by every launch), each rank's peak against
one process's, and the same greedy tokens on every layout."""

from __future__ import annotations

import json
import math
import os

import pytest

from longcat.cli import main


@pytest.mark.slow
def test_bench_memory_rows_for_one_and_two_ranks(capsys):
    # float32 generation: bf16 ranks round their partial sums differently, and a tiny random model
    # has near-ties between logits that may then go either way
    assert main(["bench", "memory", "--preset", "tiny", "--ranks", "1", "2", "--batch", "2", "--seq-len", "16",
                 "--new-tokens", "3", "--dtype", "float32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["ranks"], r["phase"]) for r in rows] == [(1, "train"), (2, "train"), (1, "infer"), (2, "infer")]
    for r in rows:
        single = next(x for x in rows if x["phase"] == r["phase"] and x["ranks"] == 1)
        assert r["single_process_peak_gib"] == single["max_rank_peak_gib"]
        assert len(r["rank_peaks_gib"]) == r["ranks"] and max(r["rank_peaks_gib"]) == r["max_rank_peak_gib"]
        # the runtime alone (torch, the process group) is most of a tiny model's peak, but not all of it
        assert 0 < r["baseline_gib"] < r["max_rank_built_gib"] <= r["max_rank_peak_gib"]
        assert 0 < r["max_rank_weights_gib"] <= r["model_bf16_gib"] * (2 if r["phase"] == "infer" else 1)
        assert r["peak_source"] == ("VmHWM" if os.path.exists("/proc/self/status") else "ru_maxrss")
        # the peaks are rounded to 3 decimals of a GiB, the share (from the unrounded peaks) too
        ratio = r["max_rank_peak_gib"] / r["single_process_peak_gib"]
        rounding = 5e-4 + 5.1e-4 * (1 + ratio) / r["single_process_peak_gib"]
        assert r["share_of_single"] == pytest.approx(ratio, abs=rounding)
    one_train, two_train, one_infer, two_infer = rows
    assert two_train["layout"] == "dp_shard=2,ep=2" and math.isfinite(two_train["loss"])
    assert abs(two_train["loss"] - one_train["loss"]) < 1e-2 * one_train["loss"]  # same checkpoint, same batch
    # generation runs `longcat generate --nproc 2`'s default layout; a rank holds less than one process
    assert two_infer["layout"] == "tp=2,ep=2" and one_infer["layout"] == "one process"
    assert two_infer["max_rank_weights_gib"] < one_infer["max_rank_weights_gib"]
    assert [len(t) for t in one_infer["tokens"]] == [3, 3]  # --batch prompts, --new-tokens each
    assert two_infer["same_tokens_on_every_rank"] is True and two_infer["same_tokens_as_one_process"] is True
    assert two_infer["tokens"] == one_infer["tokens"]
    assert "target_met" not in two_train  # only a 4-rank row is held to the 40% target


def test_bench_memory_checks_its_arguments(capsys, tmp_path):
    assert main(["bench", "memory", "--preset", "tiny", "--ranks", "0"]) == 2
    assert "--ranks must be >= 1" in capsys.readouterr().err
    # a layout generation cannot run is refused before any process starts, naming the degree
    assert main(["bench", "memory", "--preset", "tiny", "--set", "n_routed_experts=6", "--set", "zero_expert_num=3",
                 "--ranks", "1", "4", "--phases", "infer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ep=4 must divide the 6 routed experts" in err[0], err
    assert main(["bench", "memory", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "missing") in err[0], err


_CHILD_PEAKS = ("import json, resource; from longcat.telemetry import peak_rss; "
                "print(json.dumps([*peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is a Linux counter")
def test_peak_rss_is_the_childs_own_high_water_mark():
    """A child started by a parent holding 512 MiB more than the child ever does: the child's
    ru_maxrss carries the parent's resident set, its VmHWM (what the benches report) does not."""
    import subprocess
    import sys

    import torch

    ballast = torch.ones(512 * 2**20 // 4)  # 512 MiB, every page touched
    out = subprocess.run([sys.executable, "-c", _CHILD_PEAKS], capture_output=True, text=True, timeout=120, check=True)
    own, counter, ru_maxrss = json.loads(out.stdout)
    del ballast
    assert counter == "VmHWM"
    assert 0 < own < ru_maxrss - 400 * 2**20, (own, ru_maxrss)


def test_peak_rss_falls_back_to_ru_maxrss_without_procfs(monkeypatch, tmp_path):
    import resource

    from longcat import telemetry

    monkeypatch.setattr(telemetry, "PROC_STATUS", str(tmp_path / "no-such-status"))
    peak, counter = telemetry.peak_rss()
    assert counter == "ru_maxrss"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak in (kib, kib * 1024) and peak > 2**20  # bytes on macOS, KiB elsewhere
