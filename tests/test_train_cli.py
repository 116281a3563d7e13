"""`longcat train` end to end on a tiny text corpus: outputs, bad input, SIGKILL and exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longcat.cli import main
from longcat.train.metrics import read_metrics

REQUIRED_KEYS = {
    "step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mfu_peak_flops", "mfu_peak_source",
    "mem_peak_gib", "tokens_seen", "zero_expert_share", "ffn_slots_per_token", "active_params",
}
# tiny model, short windows, one thread (exact resume needs the same thread count in every run)
TINY = ["--preset", "tiny", "--threads", "1", "--no-progress", "--peak-tflops", "0.1",
        "--set", "train.seq_len=32", "--set", "train.micro_batch=4", "--set", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 60 KB of English-like text in 300 documents (a few are held out)."""
    rng = random.Random(0)
    words = ("the cat sat on a mat and then it ran to the red house where a dog lived with two small "
             "birds that sang every morning while the sun rose over the hill").split()
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(300):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 50))).capitalize() + "."
            f.write(json.dumps({"text": text}) + "\n")
    return root / "docs.jsonl"


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def test_train_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--data", str(corpus), "--out", str(out), "--steps", "12",
               "--set", "train.eval_every=6", "--set", "train.checkpoint_every=6", "--set", "train.eval_batches=2"])
    assert rc == 0
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(REQUIRED_KEYS <= set(r) for r in train)
    assert train[-1]["tokens_seen"] == 12 * 4 * 32 and train[-1]["mem_peak_gib"] > 0
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and all(r["bpb"] > 0 for r in evals)
    assert any(r["kind"] == "sample" and r["text"].startswith("The") for r in records)
    step = out / "checkpoints" / "step_12"
    for name in ("COMPLETE", "optimizer.pt", "rng.pt", "trainer_state.json", "train_config.json",
                 "tokenizer.json", "model/config.json", "model/model.safetensors"):
        assert (step / name).exists(), name
    config = json.loads((step / "train_config.json").read_text())
    assert config["model"]["hidden_size"] == 64 and config["train"]["seq_len"] == 32
    assert (out / "loss_curve.png").exists()
    err = capsys.readouterr().err
    assert "held-out loss" in err and "bits/byte" in err and "step_12" in err

    # the checkpoint is a model directory the rest of longcat reads
    from longcat.interop.native import load_model

    model = load_model(step / "model")
    assert model.config.eos_token_id == 2


def _fail(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    return err[-1]


def test_bad_input_gives_one_line_and_no_checkpoint(tmp_path, corpus, capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    no_field = tmp_path / "body.jsonl"
    no_field.write_text('{"body": "no text here"}\n')
    out = tmp_path / "out"
    base = ["train", *TINY, "--out", str(out), "--steps", "2"]

    assert "path not found" in _fail([*base, "--data", str(tmp_path / "missing")], capsys)
    assert "empty" in _fail([*base, "--data", str(empty)], capsys)
    assert "not valid UTF-8" in _fail([*base, "--data", str(bad_utf8)], capsys)
    assert "no field 'text'" in _fail([*base, "--data", str(no_field)], capsys)
    assert "unknown field 'hiden_size'" in _fail([*base, "--data", str(corpus), "--set", "model.hiden_size=8"], capsys)
    assert "'train.lr=fast'" in _fail([*base, "--data", str(corpus), "--set", "train.lr=fast"], capsys)
    assert "'optimizer' must be" in _fail([*base, "--data", str(corpus), "--set", "train.optimizer=sgd"], capsys)
    # a device this machine lacks is refused before any data work (nothing written)
    on_device = ["train", *TINY, "--out", str(tmp_path / "out_device"), "--steps", "2", "--data", str(corpus)]
    assert "train.device='gpu0' is not a device" in _fail([*on_device, "--set", "train.device=gpu0"], capsys)
    missing_device = "cuda:4096" if torch.cuda.is_available() else "cuda"
    assert f"train.device='{missing_device}':" in _fail([*on_device, "--set", f"train.device={missing_device}"], capsys)
    assert not (tmp_path / "out_device").exists()

    import longcat.data.corpus as corpus_mod

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(corpus_mod, "_open_binary", unreadable)
    assert "Permission denied" in _fail([*base, "--data", str(corpus)], capsys)
    monkeypatch.undo()
    assert not (out / "checkpoints").exists()


def test_resume_with_different_architecture(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--data", str(corpus), "--out", str(out), "--set", "train.eval_every=0"]
    assert main([*args, "--steps", "3"]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    line = _fail([*args, "--steps", "6", "--resume", "--set", "model.num_layers=3"], capsys)
    assert "different architecture" in line and "num_layers: checkpoint 2 vs this run 3" in line
    assert "--resume" in _fail([*args, "--steps", "6"], capsys)  # a fresh run refuses to overwrite
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert main([*args, "--steps", "6", "--resume"]) == 0  # the same architecture resumes
    assert [r["step"] for r in train_records(out)] == list(range(1, 7))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, corpus):
    """A real process killed by SIGKILL right after its step-20 checkpoint, resumed to step 40,
    logs exactly the losses of an uninterrupted 40-step run."""
    # decay_fraction=0: the LR schedule does not depend on --steps, so the killed run can be
    # given a step count it never reaches
    common = [*TINY, "--data", str(corpus), "--set", "train.decay_fraction=0", "--set", "train.warmup_steps=5",
              "--set", "train.checkpoint_every=20", "--set", "train.eval_every=10", "--set", "train.eval_batches=1",
              "--set", "train.sample_tokens=0"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longcat.cli", "train", *common, "--out", str(killed), "--steps", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    marker = killed / "checkpoints" / "step_20" / "COMPLETE"
    deadline = time.time() + 120
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training process exited early: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "no step-20 checkpoint within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "step_40").exists()

    assert main(["train", *common, "--out", str(killed), "--steps", "40", "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(["train", *common, "--out", str(reference), "--steps", "40"]) == 0

    resumed, uninterrupted = train_records(killed), train_records(reference)
    assert [r["step"] for r in resumed] == list(range(1, 41))  # no duplicates, no gaps
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in uninterrupted]
    evals = lambda out: [(r["step"], r["eval_loss"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]  # noqa: E731
    assert evals(killed) == evals(reference)


def test_demo_short_run(tmp_path, capsys):
    """`longcat demo` end to end, shrunk: 400 KB of the embedded corpus, a 1-layer model, 2 s."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--time-budget", "2", "--max-bytes", "400000", "--threads", "1",
            "--no-progress", "--peak-tflops", "0.1", "--set", "model.num_layers=1", "--set", "train.seq_len=64",
            "--set", "train.micro_batch=2", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for text in ("sample (temperature 0.7):", "  class Parser:\n      def __init__(self, text):", "bits/byte", "unigram baseline", "tokens/s",
                 "MFU", "checkpoint:", "metrics:", "loss curve:"):
        assert text in printed, text
    config = json.loads(next((out / "checkpoints").glob("step_*/train_config.json")).read_text())
    assert config["model"]["vocab_size"] == 8192 and config["train"]["time_budget"] == 2.0
    assert config["train"]["seq_len"] == 64  # the user's --set wins over the demo defaults
    assert config["train"]["sample_prompt"] == "class Parser:\n    def __init__(self, text):"  # a code prompt
    tokenizer = json.loads((out / "cache" / "tokenizer-8192.json").read_text())
    assert len(tokenizer["model"]["vocab"]) > 1000

    # a second demo replaces the first (keeping its token cache); a foreign directory is refused
    assert main(args) == 0
    assert len(list((out / "checkpoints").iterdir())) == 1
    assert "reusing" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main([*args[:1], "--out", str(foreign), *args[3:]]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
