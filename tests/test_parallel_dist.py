"""Every parallelism against one process on the same global batch, with real processes (gloo).

Both sides are the same `longcat.train.Trainer`: on the ranks it drives a `ParallelModel` on the
layout (`run_training`), in this test process a `LocalEngine` (`reference_run`). Most scenarios
run in ONE torchrun launch of 2 ranks (one after the other, each with its own mesh) to pay the
process start-up once; each writes its own results and final checkpoint. Some evaluate a
held-out batch of 3 rows, which does not split over 2 data ranks (or 4 micro-batches): the
engine pads it with masked rows and must still match one process on the same 3 rows.

Tolerances (fp32): losses within 1e-4 relative, final parameters within 1e-5. The learning rate
is 1e-3 and Adam's epsilon 1e-5. With the usual 3e-3 and 1e-8, one process disagrees with
ITSELF by up to ~1e-4 after 10 steps when it merely splits the batch in two (gradient
accumulation, no distributed code) or changes its thread count: a few embedding and n-gram table
entries get near-zero gradients from cancelling contributions, and Adam turns their rounding
into full-size updates. A 1e-5 parameter check would then measure that, not the parallelism.
With lr 1e-3 and eps 1e-5 that self-disagreement is ~6e-7 (measured over 3 data seeds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from longcat.parallel.launch import launch
from longcat.train.parity import RunSpec, reference_run

TIMEOUT = 300
STEPS = 10
LR = 1e-3
EPS = 1e-5
AUX = dict(mtp_weight=0.3, z_loss=1e-4, balance_loss=0.01, indexer_loss_weight=1.0)

# name -> spec. seq_len 32 > index_topk 24, so LSA really selects tokens where it is on.
SCENARIOS = {
    "fsdp": RunSpec(layout="dp_shard=2", eval_batch=3),
    "hsdp": RunSpec(layout="dp_replicate=2"),
    "fsdp_ep_all_losses": RunSpec(layout="dp_shard=2,ep=2", seq_len=32, eval_batch=3, **AUX),
    "tp_with_mtp": RunSpec(layout="tp=2", mtp_weight=0.3, z_loss=1e-4, balance_loss=0.01),
    "cp_with_lsa_indexer": RunSpec(layout="cp=2", seq_len=32, z_loss=1e-4, balance_loss=0.01, indexer_loss_weight=1.0),
    "pp_1f1b": RunSpec(layout="pp=2,pp_microbatches=4", eval_batch=3),
    "pp_interleaved": RunSpec(layout="pp=2,pp_schedule=interleaved,pp_stages_per_rank=2",
                              overrides={"num_layers": 4}),
    "nan_on_one_rank": RunSpec(layout="dp_shard=2", steps=5, nan_at_step=3, nan_rank=1),
    "fsdp_bf16_params": RunSpec(layout="dp_shard=2", steps=3, precision="bf16"),
    "fsdp_ep_bf16_autocast": RunSpec(layout="dp_shard=2,ep=2", steps=3, autocast="bf16"),
}
BF16 = ("fsdp_bf16_params", "fsdp_ep_bf16_autocast")
PARITY = [n for n in SCENARIOS if n not in ("nan_on_one_rank", *BF16)]
# Load another scenario's final checkpoint on a different layout and save it again at once.
RESHARD = {"fsdp_to_fsdp_ep": ("fsdp", "dp_shard=2,ep=2"), "fsdp_ep_to_pp": ("fsdp_ep_all_losses", "pp=2")}


def _run(specs: list[RunSpec], nproc: int, *, max_restarts: int = 0, timeout: float = TIMEOUT) -> None:
    payload = json.dumps([asdict(s) for s in specs])
    proc = launch(["-m", "longcat.train.parity_worker", payload], nproc=nproc, max_restarts=max_restarts,
                  threads_per_rank=1, timeout=timeout, capture=True)
    assert proc.returncode == 0, proc.stdout[-8000:]


def _checkpoint_tensors(path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)


def _assert_losses_match(got: dict, ref: dict, steps) -> None:
    for step in steps:
        a, b = got["losses"][str(step)], ref["losses"][step]
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs single-process {b}"


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    specs = {}
    for name, spec in SCENARIOS.items():
        specs[name] = replace(spec, steps=spec.steps if name not in PARITY else STEPS, lr=LR, adam_eps=EPS,
                              results=str(root / f"{name}.json"), out=str(root / name), peak_tflops=1.0, quiet=True)
    for name, (source, layout) in RESHARD.items():
        specs[name] = RunSpec(layout=layout, steps=0, load_from=str(root / source / "checkpoints" / f"step_{STEPS:08d}"),
                              resave_after_load=str(root / name), out=str(root / f"{name}_run"),
                              results=str(root / f"{name}.json"), peak_tflops=1.0, quiet=True)
    _run(list(specs.values()), nproc=2)
    return {name: (json.loads(Path(s.results).read_text()), s) for name, s in specs.items()}


@pytest.mark.parametrize("name", PARITY)
def test_layout_matches_single_process(two_rank_results, name):
    got, spec = two_rank_results[name]
    assert got["world_size"] == 2 and not got["skipped"]
    ref, trainer = reference_run(spec, return_trainer=True)
    _assert_losses_match(got, ref, range(1, spec.steps + 1))
    assert abs(got["eval_loss"] - ref["eval_loss"]) <= 1e-4 * ref["eval_loss"]  # forward-only path
    for step in range(1, spec.steps + 1):
        a, b = got["grad_norms"][str(step)], ref["grad_norms"][step]
        assert abs(a - b) <= 1e-4 * b, f"grad norm at step {step}: {a} vs {b}"
    saved = _checkpoint_tensors(Path(got["final_checkpoint"]))["model"]
    expected = trainer.model.state_dict()
    pipelined = "pp" in name
    # a pipelined rank holds no MTP heads (pp trains the next-token loss only)
    wanted = {k for k in expected if not (pipelined and k.startswith("mtp."))}
    assert set(saved) == wanted
    worst = max(float((saved[k].float() - expected[k].float()).abs().max()) for k in wanted)
    assert worst <= 1e-5, f"largest parameter difference {worst}"


def test_non_finite_loss_on_one_rank_skips_the_step_everywhere(two_rank_results):
    got, spec = two_rank_results["nan_on_one_rank"]
    assert got["skipped"] == [3]  # rank 0's own loss was finite: it learned of rank 1's NaN by the flag
    ref, trainer = reference_run(spec, return_trainer=True)  # the reference skips step 3 too
    assert ref["skipped"] == [3]
    _assert_losses_match(got, ref, range(1, spec.steps + 1))
    saved = _checkpoint_tensors(Path(got["final_checkpoint"]))["model"]
    for key, value in trainer.model.state_dict().items():
        assert torch.isfinite(saved[key]).all()
        torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=0)


def _assert_same_state(a: dict, b: dict, *, subset: bool = False) -> None:
    """Model and optimizer state identical (b's keys may be a subset when `subset`)."""
    for part in ("model",):
        keys = set(b[part]) if subset else set(a[part])
        assert keys <= set(a[part]) and keys <= set(b[part])
        for k in keys:
            assert torch.equal(a[part][k], b[part][k]), k
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    keys = set(sb) if subset else set(sa)
    assert keys == set(sb) and keys <= set(sa)
    for fqn in keys:
        assert set(sa[fqn]) == set(sb[fqn])
        for name in sa[fqn]:
            assert torch.equal(torch.as_tensor(sa[fqn][name]), torch.as_tensor(sb[fqn][name])), (fqn, name)


@pytest.mark.parametrize("name", list(RESHARD))
def test_checkpoint_loads_identically_on_another_layout(two_rank_results, name):
    _, spec = two_rank_results[name]
    source = _checkpoint_tensors(Path(spec.load_from))
    again = _checkpoint_tensors(Path(spec.resave_after_load) / f"step_{STEPS:08d}")
    _assert_same_state(source, again, subset=spec.layout.startswith("pp"))


@pytest.mark.slow
def test_checkpoints_reshard_between_layouts(tmp_path):
    """FSDP (2 ranks) -> FSDP+EP (2) -> one process -> pipeline (2), 4 steps each.

    Each resume re-saves right after loading: the state must be identical to what was saved,
    and the losses of the whole chain must match one uninterrupted single-process run."""
    ckpt = tmp_path / "ckpt"
    base = RunSpec(checkpoint_dir=str(ckpt), checkpoint_every=4, lr=LR, adam_eps=EPS, peak_tflops=1.0, quiet=True)
    chain = [("dp_shard=2", 2), ("dp_shard=2,ep=2", 2), ("", 1), ("pp=2", 2)]
    results = []
    for i, (layout, nproc) in enumerate(chain):
        spec = replace(base, layout=layout, steps=4 * (i + 1), results=str(tmp_path / f"r{i}.json"),
                       out=str(tmp_path / f"run{i}"),
                       resave_after_load=str(tmp_path / f"resaved{i}") if i else None)
        _run([spec], nproc=nproc)
        results.append(json.loads(Path(spec.results).read_text()))
        assert results[-1]["start_step"] == 4 * i
        if i:
            source = _checkpoint_tensors(_find(ckpt, 4 * i))
            again = _checkpoint_tensors(tmp_path / f"resaved{i}" / f"step_{4 * i:08d}")
            _assert_same_state(source, again, subset=layout.startswith("pp"))
    ref = reference_run(replace(base, steps=16))
    for i, got in enumerate(results):
        _assert_losses_match(got, ref, range(4 * i + 1, 4 * i + 5))


def _find(root: Path, step: int) -> Path:
    path = root / f"step_{step:08d}"
    assert path.exists(), f"missing {path}; have {sorted(p.name for p in root.iterdir())}"
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp_tp", "fsdp_cp_ep"])
def test_four_rank_compositions(four_rank_results, name):
    """FSDP+TP (with MTP heads) and FSDP+CP+EP (LSA selecting tokens, all losses but MTP)."""
    got, spec = four_rank_results[name]
    assert got["world_size"] == 4
    ref, trainer = reference_run(spec, return_trainer=True)
    _assert_losses_match(got, ref, range(1, spec.steps + 1))
    saved = _checkpoint_tensors(Path(got["final_checkpoint"]))["model"]
    worst = max(float((saved[k] - v).abs().max()) for k, v in trainer.model.state_dict().items())
    assert worst <= 1e-5, f"largest parameter difference {worst}"


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel4")
    scenarios = {
        "fsdp_tp": RunSpec(layout="dp_shard=2,tp=2", mtp_weight=0.3, z_loss=1e-4),
        "fsdp_cp_ep": RunSpec(layout="dp_shard=2,cp=2,ep=2", seq_len=32, z_loss=1e-4, balance_loss=0.01,
                              indexer_loss_weight=1.0),
    }
    specs = {name: replace(spec, steps=STEPS, lr=LR, adam_eps=EPS, results=str(root / f"{name}.json"),
                           out=str(root / name), peak_tflops=1.0, quiet=True) for name, spec in scenarios.items()}
    _run(list(specs.values()), nproc=4)
    return {name: (json.loads(Path(s.results).read_text()), s) for name, s in specs.items()}


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint_with_the_same_final_loss(tmp_path):
    """`longcat parallel check` with --max-restarts: rank 1 is SIGKILLed before step 6; torchrun
    restarts both ranks, they resume from the step-4 checkpoint and finish like an unbroken run."""
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "longcat.cli", "parallel", "check", "--nproc", "2", "--parallel", "dp_shard=2,ep=2",
           "--steps", "8", "--seq-len", "16", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2",
           "--crash-at-step", "5", "--crash-rank", "1", "--max-restarts", "1", "--compare", "--json", str(summary),
           "--timeout", str(TIMEOUT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT + 30,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "fault injection: killing this rank before step 6" in out
    got = json.loads(summary.read_text())
    assert got["attempt"] == 1 and got["start_step"] == 4  # the restarted group resumed at step 4
    ref = reference_run(RunSpec(steps=8, seq_len=16, checkpoint_dir="unused"))
    assert abs(got["losses"]["8"] - ref["losses"][8]) <= 1e-4 * ref["losses"][8]
    assert "largest relative loss difference" in out


@pytest.mark.parametrize("name", BF16)
def test_bf16_runs_close_to_fp32(two_rank_results, name):
    """FSDP's MixedPrecisionPolicy with bf16 parameters and fp32 reduction (what accelerators use),
    and bf16 autocast over FSDP+EP (what the trainer does on bf16 CPUs)."""
    got, spec = two_rank_results[name]
    ref = reference_run(replace(spec, precision="fp32", autocast="none"))
    for step in range(1, spec.steps + 1):
        a, b = got["losses"][str(step)], ref["losses"][step]
        assert abs(a - b) <= 2e-2 * b and a != b  # bf16 really was used, and stays close


def test_launch_timeout_leaves_no_process_behind(tmp_path):
    """A rank that hangs and ignores SIGTERM: launch() times out and kills every process it made."""
    from longcat.parallel.launch import launched_pids

    script = tmp_path / "hang.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(120)\n")
    marker = f"test-{os.getpid()}-{tmp_path.name}"
    with pytest.raises(subprocess.TimeoutExpired):
        launch([str(script)], nproc=2, timeout=8, capture=True, env={"LONGCAT_TEST_MARK": marker})
    import time

    time.sleep(0.5)
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _has_env(int(pid), f"LONGCAT_TEST_MARK={marker}")]
    assert left == [], f"processes left behind: {left}"
    assert launched_pids("no-such-launch") == []


def _has_env(pid: int, entry: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry.encode() in f.read().split(b"\0")
    except OSError:
        return False
