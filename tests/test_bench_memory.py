"""`longcat bench memory` on the tiny preset: real launches of 1 and 2 gloo ranks for both phases,
each rank's peak against one process's, and the same greedy tokens on every layout."""

from __future__ import annotations

import json
import math

import pytest

from longcat.cli import main


@pytest.mark.slow
def test_bench_memory_rows_for_one_and_two_ranks(capsys):
    assert main(["bench", "memory", "--preset", "tiny", "--ranks", "1", "2", "--batch", "2", "--seq-len", "16",
                 "--new-tokens", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["ranks"], r["phase"]) for r in rows] == [(1, "train"), (2, "train"), (1, "infer"), (2, "infer")]
    for r in rows:
        single = next(x for x in rows if x["phase"] == r["phase"] and x["ranks"] == 1)
        assert r["single_process_peak_gib"] == single["max_rank_peak_gib"]
        assert len(r["rank_peaks_gib"]) == r["ranks"] and max(r["rank_peaks_gib"]) == r["max_rank_peak_gib"]
        # the runtime alone (torch, the process group) is most of a tiny model's peak, but not all of it
        assert 0 < r["baseline_gib"] < r["max_rank_peak_gib"]
        assert r["share_of_single"] == pytest.approx(r["max_rank_peak_gib"] / r["single_process_peak_gib"], abs=2e-3)
    two_train = rows[1]
    assert two_train["layout"] == "dp_shard=2,ep=2" and math.isfinite(two_train["loss"])
    assert abs(two_train["loss"] - rows[0]["loss"]) < 1e-2 * rows[0]["loss"]  # same batch, same weights (bf16)
    assert rows[2]["tokens"] and rows[3]["same_tokens_as_one_process"] is True
    assert "target_met" not in rows[1]  # only a 4-rank row is held to the 40% target


def test_bench_memory_checks_its_arguments(capsys):
    assert main(["bench", "memory", "--preset", "tiny", "--ranks", "0"]) == 2
    assert "--ranks must be >= 1" in capsys.readouterr().err
