"""The model benchmark runs end to end and reports both sides (no timing assertions: ratios are
recorded in docs/BENCHMARKS.md, not asserted in tests)."""

import json

import pytest

from longcat.cli import main

pytest.importorskip("transformers")


def test_bench_model_reports_both_sides(capsys):
    rc = main(["bench", "model", "--preset", "tiny", "--batch", "2", "--seq-len", "32", "--rounds", "1",
               "--warmup", "0", "--precision", "fp32", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    assert row["tokens_per_step"] == 64
    assert row["ours_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["ours_tokens_per_s"] / row["transformers_tokens_per_s"])


def test_bench_rejects_unknown_override(capsys):
    assert main(["bench", "model", "--preset", "tiny", "--set", "nonsense=1", "--no-reference"]) == 2
    assert "nonsense" in capsys.readouterr().err
