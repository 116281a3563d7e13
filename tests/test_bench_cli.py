"""`longcat bench model|infer|plan` run end to end and report both sides (no timing assertions:
ratios are recorded in docs/BENCHMARKS.md, not asserted in tests)."""

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
    (["infer", "--device", "nonsense"], "--device nonsense is not a device"),
    (["model", "--device", "cpu:x"], "--device cpu:x is not a device"),
    (["plan", "--steps", "0"], "--steps must be >= 1"),
    (["plan", "--micro-batch", "0"], "--micro-batch must be >= 1"),
    (["plan", "--threads", "2"], "--clock cpu adds up the CPU seconds of every thread"),
    (["plan", "--hardware", "cpu-local", "--output", "x.toml"], "--output is where a calibration writes"),
    (["plan", "--preset", "nonsense"], "unknown preset 'nonsense'"),
    (["plan", "--hardware", "nonsense"], "unknown hardware 'nonsense'"),
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


def test_bench_infer_compares_batch_decode_with_transformers_on_the_same_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/demo here: the speculative section stays off
    rc = main(["bench", "infer", "--preset", "tiny", "--prompt-lengths", "8", "--new-tokens", "4", "--batch", "3",
               "--rounds", "1", "--modes", "eager", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    row = report["batch"]
    assert row["batch"] == 3 and row["prompt_tokens"] == [7, 8, 9]  # different lengths: transformers pads them
    assert row["eager_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
    assert row["eager_speedup"] == pytest.approx(row["eager_tokens_per_s"] / row["transformers_tokens_per_s"])
    assert row["eager_identical_output"]
    assert row["eager_vs_own_batch1"] > 0  # kept as information, not a target
    assert report["batch1"][0]["eager_identical_output"]
    assert report["cache"]["ours_bytes_per_token"] == report["cache"]["latent_bytes_per_token"]


@pytest.mark.slow
def test_bench_plan_prints_prediction_against_measurement(tmp_path, capsys):
    hardware = tmp_path / "hw.toml"
    rc = main(["bench", "plan", "--preset", "tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "1",
               "--warmup", "1", "--quick", "--output", str(hardware)])
    assert rc == 0
    out = capsys.readouterr().out
    assert 'name = "cpu-local"' in hardware.read_text()  # the calibration the planner read
    header, step, memory, live = [line for line in out.splitlines() if line.strip()][2:6]
    assert header.split() == ["predicted", "measured", "error"]
    for line, label in ((step, "step time (s)"), (memory, "peak memory (GiB)"), (live, "peak live memory (GiB)")):
        assert line.startswith(label)
        predicted, measured, error = line[len(label):].split()[:3]
        assert float(predicted) > 0 and float(measured) > 0
        assert float(error.rstrip("%")) / 100 == pytest.approx(float(predicted) / float(measured) - 1, abs=0.01)


def test_bench_refuses_the_cpu_clock_on_an_accelerator(monkeypatch, capsys):
    import torch

    import longcat.devices

    # as if this machine had the device: the refusal must come before anything is built on it
    monkeypatch.setattr(longcat.devices, "resolve_device", lambda name, setting: torch.device("cuda"))
    assert main(["bench", "infer", "--device", "cuda"]) == 2
    assert "--clock cpu counts this process's CPU seconds, not the time cuda spends working; use --clock wall" \
        in capsys.readouterr().err
