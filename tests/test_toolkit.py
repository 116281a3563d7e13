"""The validation toolkit: a shrunk `bench run` report (schema, finite and plausible numbers, nulls
with reasons, plots, the serve section against our real server), the same on 2 gloo ranks
(`--nproc 2`, with `--serve-url`), `bench compare` refusing mismatched cells (different layouts
too), the OOM search (a fake trial function and real capped child processes), numerics
statistics, and `plan calibrate --from`."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from longcat.bench.compare import compare_reports, load_report
from longcat.bench.numerics import compare_logits, curve_difference, fake_quantize_fp8, loss_spikes
from longcat.bench.oom import Trial, classify, largest_passing, run_trial
from longcat.bench.report import SCHEMA, Suite, check_report, run_report, walk_numbers
from longcat.cli import main
from longcat.errors import UserError

TEST_SUITE = Suite("test", train_seq_len=32, train_micro_batch=2, train_warmup=1, train_steps=2,
                   decode_batches=(1, 2), decode_prompts=(8,), decode_outputs=(4,), decode_repeats=1,
                   decode_modes=("eager",), oom_seq_lens=(32,), oom_skews=("uniform",), oom_memory_gib=1.0,
                   oom_max_batch=2, numerics_tokens=32, numerics_train_steps=3, calibrate_quick=True,
                   serve_prompts=4, serve_input_len=8, serve_output_len=4, serve_concurrency=2, serve_warmup=1)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """One shrunk report on the tiny preset, with `--serve` (a real server on 127.0.0.1); the OOM
    section has tests of its own below."""
    out = tmp_path_factory.mktemp("report")
    threads = torch.get_num_threads()
    try:
        run_report("tiny", out, suite=TEST_SUITE, threads=1, skip=("oom_frontier",), serve=True, progress=False,
                   argv=["bench", "run", "--model", "tiny", "--serve"], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_report_schema_and_plausible_numbers(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    check_report(report)  # schema, finite numbers, a reason for every null section
    assert report["schema"] == SCHEMA
    for key in ("run", "environment", "model", "parallelism", "workload", "results", "telemetry", "validity"):
        assert key in report, key
    env = report["environment"]
    assert env["cpu"]["logical_cores"] >= 1 and env["memory_gib"] > 0
    assert env["peak_flops_per_s"] > 0 and env["peak_flops_source"]
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert env["command"].startswith("longcat bench run")
    res = report["results"]
    train = res["train"]
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] <= 1 and train["hfu"] == train["mfu"]
    assert train["step_time_s"]["repeats"] == 2 and train["warmup_steps_excluded"] == 1
    assert 0.01 < train["peak_rss_gib"] < 64
    assert train["peak_device_memory_gib"] is None and train["peak_device_memory_reason"]
    assert train["predicted"]["step_time_s"] > 0 and train["predicted"]["memory_gib"] > 0
    cells = res["decode"]["cells"]
    assert [(c["batch"], c["prompt_tokens"], c["output_tokens"]) for c in cells] == [(1, 8, 4), (2, 8, 4)]
    for c in cells:
        assert c["all_tokens_produced"] and c["prefill_tok_per_s"] > 0
        assert c["decode_tok_per_s"] is None and c["decode_reason"] or c["decode_tok_per_s"] > 0
    assert res["decode"]["cache_bytes_per_token"] >= res["decode"]["cache_bytes_per_token_latent"] > 0
    assert res["decode"]["mtp"] is None and "untrained" in res["decode"]["mtp_reason"]  # fresh weights
    assert train["layout"] == res["decode"]["layout"] == "single process" == env["layout"]
    assert res["memory"]["train_peak_rank_memory_gib"] is None and res["memory"]["train_peak_rank_memory_reason"]
    _check_serve(res["serve"], TEST_SUITE)
    assert res["serve"]["target"]["kind"] == "started by bench run"
    assert res["serve"]["target"]["url"].startswith("http://127.0.0.1:")
    # sections not measured are null with the reason, never 0
    assert res["oom_frontier"] is None and "skipped" in report["reasons"]["oom_frontier"]
    assert res["energy"]["energy_j"] is None and res["energy"]["reason"]
    num = res["numerics"]["inference"]
    for name in ("bf16", "fp8"):
        assert num[name]["kl_mean"] >= 0 and num[name]["kl_p99"] >= num[name]["kl_mean"] * 0.5
        assert 0 <= num[name]["top1_agreement"] <= 1
        assert len(num[name]["layer_relative_drift"]) == 2  # tiny has 2 layers
    assert report["telemetry"]["fields"]["rss_bytes"]["peak"] > 0
    assert report["validity"]["load_average_before"] is not None
    assert all(math.isfinite(v) for _, v in walk_numbers(report))
    # the Markdown report and its plots
    md = (report_dir / "report.md").read_text()
    for heading in ("## Environment", "## Train", "## Decode", "## Serve", "## Memory", "## OOM frontier",
                    "## Numerics", "## Telemetry", "## Validity"):
        assert heading in md
    assert "| TTFT |" in md and "| TPOT |" in md
    for name in ("train.png", "decode.png", "telemetry.png", "numerics.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in md
    assert (report_dir / "telemetry.jsonl").read_text().count("\n") == report["telemetry"]["samples_kept"]


def test_check_report_refuses_nonfinite_and_unexplained_nulls(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    bad = copy.deepcopy(report)
    bad["results"]["train"]["tokens_per_s"] = float("nan")
    with pytest.raises(ValueError, match="results.train.tokens_per_s"):
        check_report(bad)
    bad = copy.deepcopy(report)
    bad["reasons"].pop("oom_frontier")
    with pytest.raises(ValueError, match="results.oom_frontier is null"):
        check_report(bad)
    bad = copy.deepcopy(report)
    bad["results"]["serve"]["ttft_ms"]["p99"] = float("inf")
    with pytest.raises(ValueError, match="results.serve.ttft_ms.p99"):
        check_report(bad)


def test_compare_same_and_refused_cells(report_dir, tmp_path, capsys):
    a = load_report(report_dir)
    rows = compare_reports([a, copy.deepcopy(a)], ["a", "b"])
    assert rows and all(r["ratios"] == [1.0] for r in rows if r["values"][0])
    # a different precision in one decode cell, a different model everywhere
    b = copy.deepcopy(a)
    b["results"]["decode"]["cells"][0]["precision"] = "bf16"
    rows = compare_reports([a, b], ["a", "b"])
    first = [r for r in rows if r["cell"] == "decode eager b1-p8-o4"]
    assert first and all(r["ratios"] == [None] and "precision" in r["refused"][0] for r in first)
    assert all(r["ratios"] == [1.0] for r in rows if r["cell"] == "decode eager b2-p8-o4" and r["values"][0])
    # the same cells measured on another parallel layout are refused, never divided
    d = copy.deepcopy(a)
    d["results"]["train"]["layout"] = "dp_replicate=1,dp_shard=2,ep=1,tp=1,cp=1,pp=1"
    rows = compare_reports([a, d], ["a", "d"])
    refused = [r for r in rows if r["cell"] == "train"]
    assert refused and all(r["ratios"] == [None] and "layout" in r["refused"][0] for r in refused)
    assert any(r["ratios"] == [1.0] for r in rows if r["cell"].startswith("serve"))
    c = copy.deepcopy(a)
    c["model"]["config_hash"] = "0" * 16
    rows = compare_reports([a, c], ["a", "c"])
    assert all(r["ratios"] == [None] and "model" in r["refused"][0] for r in rows)
    # the command prints the table and the refusals
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "report.json").write_text(json.dumps(c))
    assert main(["bench", "compare", str(report_dir / "report.json"), str(tmp_path / "c" / "report.json")]) == 0
    printed = capsys.readouterr().out
    assert "refused" in printed and "model:" in printed
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(UserError, match="schema"):
        load_report(tmp_path / "bad.json")
    with pytest.raises(UserError, match="at least two"):
        compare_reports([a], ["a"])


def _check_serve(serve, suite):
    """The serve section's numbers: every request completed, latencies ordered and finite."""
    assert serve["requests"] == serve["completed"] == suite.serve_prompts and serve["failed"] == 0
    assert serve["output_tokens"] > 0 and serve["output_tok_per_s"] > 0 and serve["requests_per_s"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        row = serve[key]
        assert 0 < row["p50"] <= row["p90"] <= row["p99"] and math.isfinite(row["mean"]), (key, row)
    assert serve["ttft_ms"]["p50"] < serve["e2el_ms"]["p99"]
    assert serve["workload"]["seed"] == 0 and serve["workload"]["concurrency"] == suite.serve_concurrency


@pytest.mark.slow
def test_report_on_two_ranks_and_another_server(report_dir, tmp_path):
    """`bench run --nproc 2 --parallel dp_shard=2 --serve-url URL`: train through `longcat train
    --nproc 2`, decode on 2 ranks (tp=2,ep=2), the serve load against a server the test started;
    compare refuses every timed cell of the one-process report (other layout)."""
    from longcat.bench.serve_load import start_server, stop_server

    proc, url, _ = start_server(str(report_dir / "serve-model"), max_running=2, threads=1)
    try:
        report = run_report("tiny", tmp_path, suite=TEST_SUITE, threads=2, nproc=2, parallel="dp_shard=2",
                            serve_url=url + "/v1", skip=("oom_frontier", "numerics"), progress=False,
                            log=lambda *_: None)
    finally:
        stop_server(proc)
    check_report(report)
    assert report == json.loads((tmp_path / "report.json").read_text())
    res, layout = report["results"], "dp_replicate=1,dp_shard=2,ep=1,tp=1,cp=1,pp=1"
    assert report["environment"]["layout"] == report["validity"]["layout"] == layout
    assert report["parallelism"]["processes"] == 2
    train = res["train"]
    assert train["layout"] == layout and train["processes"] == 2 and train["step_time_s"]["repeats"] == 2
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] <= 1
    assert 0.05 < train["peak_rank_memory_gib"] < 64 and res["memory"]["train_peak_rank_memory_gib"] > 0
    assert train["predicted"] is None and "share this CPU" in train["predicted_reason"]
    decode = res["decode"]
    assert decode["layout"] == report["parallelism"]["decode_layout"] == "dp_replicate=1,dp_shard=1,ep=2,tp=2,cp=1,pp=1"
    assert [c["workload"] for c in decode["cells"]] == ["b1-p8-o4", "b2-p8-o4"]
    assert all(c["all_tokens_produced"] and c["prefill_tok_per_s"] > 0 for c in decode["cells"])
    assert decode["peak_rank_rss_gib"] > 0 and len(decode["rank_weight_bytes"]) == 2
    _check_serve(res["serve"], TEST_SUITE)
    assert res["serve"]["target"]["kind"].startswith("external") and res["serve"]["target"]["layout"] is None
    assert "## Serve" in (tmp_path / "report.md").read_text()
    rows = compare_reports([load_report(report_dir), report], ["one", "two"])
    timed = [r for r in rows if r["cell"] == "train" or r["cell"].startswith("decode")]
    assert timed and all(r["ratios"] == [None] and "layout" in r["refused"][0] for r in timed)


def test_plan_calibrate_from_report(report_dir, tmp_path):
    from longcat.plan.from_report import hardware_from_report
    from longcat.plan.hardware import load_hardware

    text, fit = hardware_from_report(report_dir / "report.json", "mine")
    path = tmp_path / "mine.toml"
    path.write_text(text)
    hw = load_hardware(str(path))
    report = json.loads((report_dir / "report.json").read_text())
    assert hw.name == "mine" and hw.provenance["peak_tflops_bf16"] == "measured"
    assert math.isclose(hw.peak_tflops_bf16 * 1e12, report["environment"]["peak_flops_per_s"], rel_tol=1e-5)
    if fit["note"] is None:  # the fit reached the measured step time
        assert math.isclose(fit["predicted_step_time_s"], fit["measured_step_time_s"], rel_tol=0.01)
    assert main(["plan", "calibrate", "--from", str(report_dir / "report.json"), "--output",
                 str(tmp_path / "cli.toml")]) == 0
    assert main(["plan", "calibrate", "--from", str(tmp_path / "missing.json")]) == 2


def test_largest_passing_doubles_then_bisects():
    for threshold in (0, 1, 2, 37, 64, 100):
        found, calls = largest_passing(lambda n, t=threshold: "ok" if n <= t else "oom", limit=128)
        assert found == threshold
        assert len(calls) <= 2 * 8 + 1  # log2(128) doublings + as many bisection steps
        assert len({n for n, _ in calls}) == len(calls)  # no batch tried twice
    found, calls = largest_passing(lambda n: "ok", limit=100)
    assert found == 100 and calls[-1] == (100, "ok")
    found, _ = largest_passing(lambda n: "timeout" if n >= 5 else "ok", limit=64)
    assert found == 4


def test_classify_trial_endings():
    assert classify(0, "") == "ok"
    assert classify(1, "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried") == "oom"
    assert classify(1, "RuntimeError: could not create a primitive") == "oom"
    assert classify(-9, "") == "oom"
    assert classify(1, "ValueError: something else") == "error"


def test_real_trials_ok_and_oom_under_a_cap(tmp_path):
    ok = run_trial(Trial("tiny", "decode", seq_len=16, batch=1, memory_gib=1.0, timeout_s=120))
    assert ok.status == "ok", ok.message
    assert ok.peak_rss_gib > 0 and ok.baseline_vms_gib > 0
    # small's fp32 weights alone are 87 MB: more than the 10 MB left to them
    refused = run_trial(Trial("small", "decode", seq_len=16, batch=1, memory_gib=0.01, timeout_s=120))
    assert refused.status == "oom", refused.message


def test_numerics_statistics():
    logits = torch.randn(20, 50, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 50, (20,))
    same = compare_logits(logits, logits.clone(), targets)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1
    assert same["ln_ppl_ratio"] == pytest.approx(0, abs=1e-6) and same["rms_delta_p"] == pytest.approx(0, abs=1e-6)
    other = compare_logits(logits, logits + torch.randn(20, 50), targets)
    assert other["kl_mean"] > 0 and other["kl_p99"] >= other["kl_mean"] and other["top1_agreement"] < 1
    spikes = loss_spikes([5.0, 4.8, 4.6, 4.5, 12.0, 4.3, 4.2], k=2.0)
    assert [s["step"] for s in spikes] == [5]
    assert curve_difference([2.0, 2.0], [2.0, 3.0]) == pytest.approx(0.25)


def test_fake_fp8_quantization_is_close_but_not_exact():
    from longcat.config import preset
    from longcat.model import build_model

    model = build_model(preset("tiny"), seed=0)
    quantized = fake_quantize_fp8(model)
    w, q = model.lm_head.weight, quantized.lm_head.weight
    assert not torch.equal(w, q)
    assert ((q - w).norm() / w.norm()).item() < 0.1  # e4m3 keeps ~2 significant digits
    assert torch.equal(model.embed_tokens.weight, quantized.embed_tokens.weight)  # tables are not quantized


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "run", "--model", "no-such-model", "--out", str(tmp_path / "r")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["bench", "oom", "--model", "tiny", "--memory-gib", "0"]) == 2
    assert "--memory-gib must be > 0" in capsys.readouterr().err
    assert main(["bench", "run", "--model", "tiny", "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "no cuda device" in capsys.readouterr().err
    for extra, message in ((["--nproc", "2", "--parallel", "dp_shard=3"], "set dp_shard=2"),
                           (["--parallel", "dp_shard=2"], "--parallel needs --nproc"),
                           (["--nproc", "2", "--clock", "cpu", "--threads", "1"], "use --clock wall with --nproc"),
                           (["--serve", "--serve-url", "http://127.0.0.1:9"], "give one"),
                           (["--serve-url", "http://127.0.0.1:9"], "cannot list the models")):
        assert main(["bench", "run", "--model", "tiny", "--out", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()
    shutil.rmtree(tmp_path / "r", ignore_errors=True)


def test_energy_counters_summed(tmp_path):
    from longcat.bench.report import energy_now
    from longcat.telemetry import Telemetry

    idle = Telemetry(rapl_root=tmp_path).start()
    assert energy_now(idle) is None  # no counter: None, not 0
    idle.stop()
    domain = tmp_path / "intel-rapl:0"
    domain.mkdir()
    (domain / "energy_uj").write_text("1000000")
    (domain / "max_energy_range_uj").write_text("1000000000")
    telemetry = Telemetry(interval_s=100, rapl_root=tmp_path).start()
    (domain / "energy_uj").write_text("3500000")
    assert energy_now(telemetry) == pytest.approx(2.5)
    telemetry.stop()
