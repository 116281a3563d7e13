"""`longcat train --nproc N --parallel LAYOUT`: a real 2-process run of the Trainer against the
same Trainer in one process, and impossible layouts refused before any process starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from longcat.cli import main

COMMON = ["--preset", "tiny", "--steps", "6", "--set", "train.seq_len=32", "--set", "train.micro_batch=4",
          "--set", "train.precision=fp32", "--set", "train.device=cpu", "--threads", "1", "--no-progress",
          "--peak-tflops", "1"]


def _train_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}, records


@pytest.mark.slow
def test_two_process_train_matches_one_process(corpus, tmp_path):
    out2, out1 = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "longcat.cli", "train", "--data", str(corpus), *COMMON]
    proc = subprocess.run([*cmd, "--nproc", "2", "--parallel", "dp_shard=2,ep=2", "--out", str(out2)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "held-out loss" in proc.stderr and "throughput" in proc.stderr  # the end-of-run summary, once
    assert proc.stderr.count("trained to step 6") == 1
    losses2, records2 = _train_losses(out2)
    assert sorted(losses2) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in losses2.values())
    assert records2[-1]["kind"] == "eval" and math.isfinite(records2[-1]["eval_loss"])
    ckpt = out2 / "checkpoints" / "step_00000006"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "train_config.json").exists()

    proc = subprocess.run([*cmd, "--out", str(out1)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses1, records1 = _train_losses(out1)
    for step, loss in losses1.items():
        assert abs(losses2[step] - loss) <= 1e-4 * abs(loss), (step, losses2[step], loss)
    # one metrics record: the same keys on 1 and 2 ranks, the same active-parameter count for MFU
    train1 = [r for r in records1 if r["kind"] == "train"]
    train2 = [r for r in records2 if r["kind"] == "train"]
    assert [set(r) for r in train1] == [set(r) for r in train2]
    assert all(r["mem_peak_gib"] > 0 for r in train2)
    assert (train1[0]["world_size"], train2[0]["world_size"]) == (1, 2)
    for a, b in zip(train1, train2):
        assert a["active_params"] == pytest.approx(b["active_params"], rel=1e-3)
        assert b["mfu_peak_flops"] == 2 * a["mfu_peak_flops"]  # the peak of every device used
    eval1 = [r for r in records1 if r["kind"] == "eval"][-1]
    eval2 = records2[-1]
    # the held-out split has an odd number of 32-token windows, so its last batch does not split
    # over 2 ranks: it is padded, not dropped
    assert (eval1["eval_tokens"] // 32) % 2 == 1
    assert eval1["eval_tokens"] == eval2["eval_tokens"]
    assert abs(eval1["eval_loss"] - eval2["eval_loss"]) <= 1e-4 * eval1["eval_loss"]

    # --resume continues the 2-rank run from its DCP checkpoint, here on another layout
    proc = subprocess.run([*cmd, "--nproc", "2", "--parallel", "dp_shard=2", "--out", str(out2), "--resume",
                           "--steps", "8"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stderr and "step_00000006" in proc.stderr
    resumed, _ = _train_losses(out2)
    assert sorted(resumed) == list(range(1, 9))
    assert all(resumed[s] == losses2[s] for s in range(1, 7))  # the first run's records are kept as they were
    assert (out2 / "checkpoints" / "step_00000008" / "COMPLETE").exists()


def test_impossible_layout_fails_before_launch(corpus, tmp_path, capsys, monkeypatch):
    import longcat.parallel.launch as launch

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("processes were launched"))
    out = tmp_path / "out"
    code = main(["train", "--data", str(corpus), *COMMON, "--nproc", "3", "--parallel", "dp_shard=3,ep=3",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ep" in err and "3" in err, err
    assert not out.exists()


def test_muon_refused_with_parallel(corpus, tmp_path, capsys):
    code = main(["train", "--data", str(corpus), *COMMON, "--nproc", "2", "--set", "train.optimizer=muon",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "optimizer=adamw" in capsys.readouterr().err
