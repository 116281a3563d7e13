"""Trainer, optimizers, schedule, checkpoints and router balancing on synthetic tokens (tiny preset)."""

from __future__ import annotations

import errno
import json
import math

import numpy as np
import pytest
import torch

from longcat.config import ConfigError, preset
from longcat.model import build_model
from longcat.train import checkpoint as ckpt
from longcat.train import engine as engine_mod
from longcat.train.config import RunConfig, TrainConfig, build_run_config, split_overrides
from longcat.train.metrics import read_metrics
from longcat.train.optim import ExpertMuon, WSDSchedule, batched_newton_schulz, build_optimizers
from longcat.train.engine import router_target_share, update_router_bias
from longcat.train.trainer import EvalData, Trainer, TrainingError

REQUIRED_KEYS = {
    "step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mfu_peak_flops", "mfu_peak_source",
    "mem_peak_gib", "tokens_seen", "zero_expert_share", "ffn_slots_per_token", "active_params", "world_size",
    "layout",
}


class SyntheticBatches:
    """In-memory stand-in for longcat.data.PackedBatches: random windows of a fixed token array,
    drawn from a generator keyed by (seed, batch index) so its whole state is one integer."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, self.batch_size)
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts])  # (B, T+1)
        return torch.from_numpy(windows[:, :-1]).long(), torch.from_numpy(windows[:, 1:]).long()

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


# Learnable structure: arithmetic runs with a per-document stride, documents ended by eos (2).
def synthetic_tokens(n_docs: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, stride, length = rng.integers(3, 500), rng.integers(1, 9), rng.integers(20, 80)
        docs.append((start + stride * np.arange(length)) % 509 + 3)
        docs.append(np.array([2]))
    return np.concatenate(docs).astype(np.int64)


TOKENS = synthetic_tokens()
HELDOUT = synthetic_tokens(20, seed=1)


def eval_data() -> EvalData:
    def batches():
        source = SyntheticBatches(HELDOUT, 32, 4, seed=123)
        return (source.next_batch() for _ in range(2))

    return EvalData(batches, tokens=len(HELDOUT), bytes=3 * len(HELDOUT))


def make_run(**train) -> RunConfig:
    values = dict(steps=40, seq_len=32, micro_batch=4, warmup_steps=5, decay_fraction=0.5, eval_every=10,
                  checkpoint_every=20, progress=False, threads=1, peak_tflops=0.1, log_every=0, tensorboard=False)
    values.update(train)
    return RunConfig(model=preset("tiny"), train=TrainConfig(**values))


def make_trainer(out, run=None, *, resume=False, on_step=None, **train) -> Trainer:
    run = run or make_run(**train)
    return Trainer(run, out, batches=SyntheticBatches(TOKENS, run.train.seq_len, run.train.micro_batch),
                   eval_data=eval_data(), resume=resume, on_step=on_step)


class Crash(Exception):
    pass


def crash_at(step: int):
    def hook(trainer, record):
        if trainer.step == step:
            raise Crash()

    return hook


def train_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    # uninterrupted 40 steps
    full = make_trainer(tmp_path / "full", optimizer=optimizer)
    full.train()
    reference = train_losses(tmp_path / "full")
    assert [s for s, _ in reference] == list(range(1, 41))
    first, last = np.mean([v for _, v in reference[:5]]), np.mean([v for _, v in reference[-5:]])
    assert last < first - 0.3, "the model should learn the synthetic sequences"

    # crash after step 23 (last checkpoint: step 20), then resume to 40
    with pytest.raises(Crash):
        make_trainer(tmp_path / "cut", optimizer=optimizer, on_step=crash_at(23)).train()
    assert [s for s, _ in train_losses(tmp_path / "cut")] == list(range(1, 24))
    resumed = make_trainer(tmp_path / "cut", optimizer=optimizer, resume=True)
    assert resumed.step == 20 and resumed.resumed_from.name == "step_20"
    result = resumed.train()
    assert result.step == 40
    assert train_losses(tmp_path / "cut") == reference  # no duplicate steps, same bits

    records = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert all(REQUIRED_KEYS <= set(r) for r in train)
    assert train[-1]["tokens_seen"] == 40 * 4 * 32
    assert train[0]["mfu_peak_source"].startswith("--peak-tflops")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    # bpb = nats/token * tokens/byte / ln 2; the synthetic eval data has 3 bytes per token
    assert evals[-1]["bpb"] == pytest.approx(evals[-1]["eval_loss"] / 3 / math.log(2))
    assert [r["step"] for r in evals] == [r["step"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "eval"]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_write = ckpt._write_text

    def write_or_fail(path, text):
        if "step_20" in str(path.parent):  # the second save runs out of disk half-way
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(ckpt, "_write_text", write_or_fail)
    trainer = make_trainer(out, steps=30, checkpoint_every=10)
    with pytest.raises(TrainingError, match="no space left on device.*step_10 is intact"):
        trainer.train()
    monkeypatch.undo()
    names = sorted(d.name for d in (out / "checkpoints").iterdir())
    assert names == ["step_10"], names  # the half-written step_20 directory is gone
    assert ckpt.newest_complete(out / "checkpoints").name == "step_10"

    # leftovers of a save killed half-way are never picked
    (out / "checkpoints" / "step_20.tmp-x").mkdir()
    (out / "checkpoints" / "step_20.tmp-x" / "optimizer.pt").write_bytes(b"partial")
    (out / "checkpoints" / "step_25").mkdir()  # no COMPLETE marker
    resumed = make_trainer(out, steps=30, checkpoint_every=10, resume=True)
    assert resumed.step == 10
    resumed.train()
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step_10", "step_20", "step_30"]
    assert [s for s, _ in train_losses(out)] == list(range(1, 31))


def test_keep_last_k_checkpoints(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, steps=25, checkpoint_every=5, keep_checkpoints=2, eval_every=0).train()
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step_20", "step_25"]
    state = json.loads((out / "checkpoints" / "step_25" / "trainer_state.json").read_text())
    assert state["step"] == 25 and state["sampler"] == {"index": 25}
    assert (out / "checkpoints" / "step_25" / "model" / "model.safetensors").exists()


def test_fresh_run_refuses_existing_checkpoints(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, steps=5, checkpoint_every=5, eval_every=0).train()
    with pytest.raises(ConfigError, match="--resume"):
        make_trainer(out, steps=5)


def test_resume_with_other_architecture_names_fields(tmp_path):
    out = tmp_path / "run"
    make_trainer(out, steps=5, checkpoint_every=5, eval_every=0).train()
    other = RunConfig(model=preset("tiny", hidden_size=128, ffn_hidden_size=96), train=make_run(steps=10).train)
    with pytest.raises(ConfigError, match=r"hidden_size: checkpoint 64 vs this run 128.*ffn_hidden_size"):
        make_trainer(out, other, resume=True)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    poisoned = {3, 4}
    calls = {"n": 0}
    real = engine_mod.training_losses

    def maybe_nan(output, labels, **weights):
        calls["n"] += 1
        losses = real(output, labels, **weights)
        if calls["n"] in poisoned:
            losses["lm"] = losses["lm"] * float("nan")
            losses["loss_total"] = losses["loss_total"] * float("nan")
        return losses

    monkeypatch.setattr(engine_mod, "training_losses", maybe_nan)
    snapshots = {}

    def snapshot(trainer, record):
        snapshots[trainer.step] = trainer.model.lm_head.weight.detach().clone()

    trainer = make_trainer(tmp_path / "a", steps=8, eval_every=0, checkpoint_every=0, on_step=snapshot)
    result = trainer.train()
    records = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped"] for r in records] == [False, False, True, True, False, False, False, False]
    assert records[2]["loss"] is None  # NaN is written as null (valid JSON)
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])
    assert not torch.equal(snapshots[4], snapshots[5])
    assert result.skipped_steps == 2 and result.step == 8

    calls["n"] = 0
    poisoned.update(range(1, 100))
    with pytest.raises(TrainingError, match="3 consecutive steps with a non-finite loss"):
        make_trainer(tmp_path / "b", steps=8, max_skipped_steps=3, eval_every=0).train()


def test_router_bias_update_moves_load_toward_target():
    config = preset("tiny", expected_ffn_experts_per_token=1.5)
    target = router_target_share(config)
    N, Z, k = config.n_routed_experts, config.zero_expert_num, config.moe_topk
    assert target.sum().item() == pytest.approx(1.0)
    assert target[0].item() == pytest.approx(1.5 / (k * N)) and target[-1].item() == pytest.approx((1 - 1.5 / k) / Z)

    torch.set_num_threads(1)  # restored by the fixture
    model = build_model(config, seed=0)
    model.eval()
    # skewed routing to start from: favour expert 0 and the identity experts
    for layer in model.layers:
        layer.mlp.router.e_score_correction_bias[0] = 0.05
    x = torch.from_numpy(TOKENS[: 4 * 64].reshape(4, 64))

    def distance():
        with torch.no_grad():
            counts = model(x, mtp=False, indexer_loss=False).router.counts
        share = counts.float() / counts.sum(-1, keepdim=True)
        return (share - target).abs().sum(-1).mean().item(), counts

    before, counts = distance()
    for _ in range(40):
        update_router_bias(model, counts, rate=2e-3, mode="sign")
        _, counts = distance()
    after, counts = distance()
    assert after < 0.5 * before, (before, after)
    ffn_slots = counts[:, :N].sum().item() / (x.numel() * config.num_layers)
    assert abs(ffn_slots - 1.5) < 0.3, ffn_slots  # the zero-expert budget K_e is met


def test_router_bias_diff_mode_is_proportional():
    model = build_model(preset("tiny"), seed=0)
    counts = torch.zeros(2, 12)
    counts[:, 0] = 30  # every slot on expert 0
    delta = update_router_bias(model, counts, rate=0.5, mode="diff")
    target = router_target_share(model.config)
    assert torch.allclose(delta[0], 0.5 * (target - torch.eye(12)[0]))
    assert torch.allclose(model.layers[1].mlp.router.e_score_correction_bias, delta[1])


def test_wsd_schedule_steps_and_time():
    s = WSDSchedule(TrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1))
    assert s.scale(0) == pytest.approx(0.1) and s.scale(9) == 1.0
    assert s.scale(50) == 1.0 and s.scale(80) == 1.0
    assert s.scale(90) == pytest.approx(0.55) and s.scale(99) == pytest.approx(0.1 + 0.9 * 0.05)
    assert not s.done(99, 0) and s.done(100, 0)
    # with a time budget the decay follows the clock: 90% of 60 s used -> halfway through the decay
    t = WSDSchedule(TrainConfig(steps=10**6, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0, time_budget=60))
    assert t.scale(500, elapsed=30) == 1.0
    assert t.scale(500, elapsed=54) == pytest.approx(0.5)
    assert not t.done(500, 59.9) and t.done(500, 60)


def test_time_budget_stops_with_decayed_lr_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(out, steps=100_000, time_budget=3.0, decay_fraction=0.5, checkpoint_every=0, eval_every=0)
    result = trainer.train()
    assert result.stopped == "time_budget" and 5 < result.step < 100_000
    assert result.checkpoint.name == f"step_{result.step}" and (result.checkpoint / ckpt.COMPLETE).exists()
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    peak = max(r["lr"] for r in records)
    assert records[-1]["lr"] < 0.25 * peak  # decayed by the end of the budget
    assert any(r["kind"] == "eval" for r in read_metrics(out / "metrics.jsonl"))


def test_muon_parameter_groups_and_batched_newton_schulz():
    model = build_model(preset("tiny"), seed=0)
    opts = build_optimizers(model, TrainConfig(optimizer="muon"))
    assert set(opts.optimizers) == {"adamw", "muon", "muon_experts"}
    ids = lambda name: {id(p) for g in opts.optimizers[name].param_groups for p in g["params"]}  # noqa: E731
    assert id(model.embed_tokens.weight) in ids("adamw") and id(model.lm_head.weight) in ids("adamw")
    assert id(model.norm.weight) in ids("adamw")
    assert id(model.layers[0].self_attn[0].q_a_proj.weight) in ids("muon")
    assert id(model.layers[0].mlp.experts.gate_up_proj) in ids("muon_experts")
    assert len(ids("adamw") | ids("muon") | ids("muon_experts")) == len(list(model.parameters()))

    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(3, 20, 12)
    coeffs = (3.4445, -4.775, 2.0315)
    batched = batched_newton_schulz(g, coeffs, 5, 1e-7)
    for i in range(3):
        assert torch.allclose(batched[i].float(), _zeropower_via_newtonschulz(g[i], coeffs, 5, 1e-7).float(), atol=2e-2)
    with pytest.raises(ValueError, match="stacked"):
        ExpertMuon([torch.nn.Parameter(torch.zeros(3, 3))])


def test_config_overrides_and_errors(tmp_path):
    model, train = split_overrides(["model.hidden_size=128", "train.lr=1e-3", "seq_len=64", "tokenizer=none"])
    assert model == {"hidden_size": 128} and train == {"lr": 1e-3, "seq_len": 64, "tokenizer": None}
    with pytest.raises(ConfigError, match="unknown field 'hiden_size'"):
        split_overrides(["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="unknown field 'lrr'"):
        split_overrides(["lrr=3"])
    with pytest.raises(ConfigError, match="'train.lr=fast'.*float"):
        split_overrides(["train.lr=fast"])
    with pytest.raises(ConfigError, match="table must be 'model' or 'train'"):
        split_overrides(["optim.lr=1"])
    with pytest.raises(ConfigError, match="'optimizer' must be 'adamw' or 'muon'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="'steps' must be int"):
        TrainConfig(steps="ten")

    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\nhidden_size = 96\n\n[train]\nlr = 0.002\nsteps = 7\n')
    run = build_run_config(config_file=toml, overrides=["train.steps=9"], train_values={"seed": 3})
    assert run.model.hidden_size == 96 and run.model.num_layers == 2
    assert (run.train.lr, run.train.steps, run.train.seed) == (0.002, 9, 3)
    toml.write_text('[train]\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="unknown field.*learning_rate"):
        build_run_config(config_file=toml)
    toml.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match="'steps' must be int"):
        build_run_config(config_file=toml)


def test_unigram_baselines():
    from longcat.train.run import unigram_bpb, unigram_heldout_bpb

    tokens = np.array([0, 1, 2, 3] * 250)  # uniform over 4 symbols: 2 bits per token
    assert unigram_bpb(tokens, num_bytes=1000, vocab_size=8) == pytest.approx(2.0)
    assert unigram_bpb(tokens, num_bytes=2000, vocab_size=8) == pytest.approx(1.0)
    # add-one smoothing over 8 entries: each seen token has probability 251/1008
    heldout = np.array([0, 1, 2, 3])
    expected = -math.log2(251 / 1008)
    assert unigram_heldout_bpb(tokens, heldout, 4, vocab_size=8) == pytest.approx(expected)
