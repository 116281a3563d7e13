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


@pytest.mark.parametrize("argv, message", [
    (["model", "--batch", "0"], "--batch must be >= 1"),
    (["model", "--rounds", "0"], "--rounds must be >= 1"),
    (["model", "--threads", "0"], "--threads must be >= 1"),
    (["infer", "--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["infer", "--prompt-lengths", "32", "0"], "--prompt-lengths must all be >= 1"),
    (["infer", "--speculative", "0"], "--speculative draft counts must be >= 1"),
    (["infer", "--model", "/nonexistent-model-dir"], "does not exist"),
])
def test_bench_refuses_bad_arguments_before_it_starts(argv, message, capsys):
    assert main(["bench", *argv]) == 2  # refused at once: no model built, nothing timed
    assert message in capsys.readouterr().err


def test_bench_infer_refuses_a_model_without_mtp_heads_up_front(tmp_path, capsys):
    from longcat.config import preset
    from longcat.interop.native import save_model
    from longcat.model import build_model

    save_model(build_model(preset("tiny", mtp_num_layers=0), seed=0), tmp_path / "no_mtp")
    assert main(["bench", "infer", "--model", str(tmp_path / "no_mtp")]) == 2
    assert "no MTP heads" in capsys.readouterr().err
