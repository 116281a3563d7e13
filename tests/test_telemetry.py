"""The telemetry sampler: process counters, energy counters (a fake RAPL tree), npu-smi parsing, and
the fields it adds to a training run's metrics.jsonl."""

from __future__ import annotations

import json
import math
import random
import time

import torch

from longcat.cli import main
from longcat.telemetry import GiB, Telemetry, parse_npu_smi, rapl_domains
from longcat.train.metrics import read_metrics


def test_sampler_records_rss_and_its_growth(tmp_path):
    with Telemetry(interval_s=0.02, rapl_root=tmp_path) as telemetry:
        before = telemetry.read()["rss_bytes"]
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.1)
        telemetry.sample()
        del block
    summary = telemetry.summary()
    assert summary["backends"]["process"] == "ok"
    rss = summary["fields"]["rss_bytes"]
    assert rss["peak"] >= before + 60 * 2**20  # the 64 MiB block was seen
    assert rss["peak"] >= rss["mean"] > 0
    assert summary["readings"] >= 3 and len(telemetry.samples) == summary["samples_kept"]
    assert all(s["t_s"] >= 0 and "rss_bytes" in s for s in telemetry.samples)
    # no GPU and no energy counter here: named with the reason, not reported as 0
    assert summary["energy_j"] is None and "rapl" in summary["energy_reason"]
    assert summary["backends"]["device_memory"].startswith("cpu:")


def test_samples_stay_bounded():
    telemetry = Telemetry(interval_s=10, max_samples=8).start()
    for _ in range(100):
        telemetry.sample()
    telemetry.stop()
    assert len(telemetry.samples) <= 8
    assert telemetry.summary()["readings"] == 102  # start, 100, stop: every reading counts in the summary
    times = [s["t_s"] for s in telemetry.samples]
    assert times == sorted(times)


def _fake_rapl(root, values):
    for i, v in enumerate(values):
        d = root / f"intel-rapl:{i}"
        d.mkdir(exist_ok=True)
        (d / "energy_uj").write_text(str(v))
        (d / "max_energy_range_uj").write_text("1000000000")
    (root / "intel-rapl:0:0").mkdir(exist_ok=True)  # a sub-zone: inside the package, not counted twice


def test_rapl_energy_with_wraparound(tmp_path):
    _fake_rapl(tmp_path, [999_000_000, 5_000_000])
    assert [p.name for p in rapl_domains(tmp_path)] == ["intel-rapl:0", "intel-rapl:1"]
    telemetry = Telemetry(interval_s=100, rapl_root=tmp_path).start()
    _fake_rapl(tmp_path, [1_000_000, 7_000_000])  # package 0 wrapped: +2 J; package 1: +2 J
    telemetry.sample()
    telemetry.stop()
    summary = telemetry.summary()
    assert summary["backends"]["rapl"] == "ok"
    assert math.isclose(summary["energy_j"], 4.0) and "RAPL" in summary["energy_source"]


def test_npu_smi_output_parsed():
    text = ("        NPU ID                         : 0\n        Chip Count                     : 1\n\n"
            "        Power Dissipation(W)           : 93.6\n        Aicore Usage Rate(%)           : 42\n")
    assert parse_npu_smi(text) == {"power_w": 93.6, "utilization_percent": 42.0}


def test_training_records_gain_telemetry_fields(tmp_path):
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to the red house".split()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n"
                              for _ in range(60)))
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "--preset", "tiny", "--threads", "1", "--no-progress", "--peak-tflops", "0.1",
                   "--set", "train.seq_len=32", "--set", "train.micro_batch=2", "--set", "train.tensorboard=false",
                   "--set", "train.eval_every=0", "--set", "train.sample_every=0",
                   "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "3"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 3
    for r in train:
        assert 0.01 < r["rss_gib"] < 64  # a Python process with torch loaded, in GiB
        assert r["cpu_percent"] is not None and r["cpu_percent"] >= 0
        assert r["device_mem_gib"] is None  # the CPU has no device allocator: null, not 0
    assert GiB == 2**30


def test_children_are_summed_when_asked():
    import subprocess
    import sys

    script = "x = bytearray(96 * 2**20)\nimport time\ntime.sleep(0.6)"
    with Telemetry(interval_s=0.05, children=True) as telemetry:
        subprocess.run([sys.executable, "-c", script], check=True)
    fields = telemetry.summary()["fields"]
    assert fields["children_rss_bytes"]["peak"] >= 90 * 2**20
    with Telemetry(interval_s=0.05) as own_only:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert "children_rss_bytes" not in own_only.summary()["fields"]  # children are counted only when asked
