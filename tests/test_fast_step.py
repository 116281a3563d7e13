"""The faster training step computes the same maths: the fused chunked cross-entropy, the bucketed
expert groups, and a 20-step run against the unfused, unbucketed step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longcat.model.moe as moe
from longcat.config import preset
from longcat.model import build_model, lm_losses
from longcat.model.cross_entropy import IGNORE_INDEX, block_rows_for, linear_cross_entropy
from longcat.model.lm import LongCatForCausalLM
from longcat.model.moe import GroupedExperts, bucket_rows, bucketed_count

from test_train import TOKENS, SyntheticBatches, make_run, train_losses


def _reference_ce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("block_rows", [7, 64, None])
def test_fused_cross_entropy_equals_unfused_with_ignored_rows(block_rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (50,), generator=g)
    labels[[0, 13, 49]] = IGNORE_INDEX
    ref = _reference_ce(hidden, weight, labels)
    ref_h, ref_w = torch.autograd.grad(ref * 3.0, (hidden, weight))
    fused = linear_cross_entropy(hidden, weight, labels, block_rows=block_rows)
    got_h, got_w = torch.autograd.grad(fused * 3.0, (hidden, weight))  # upstream gradient is applied
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_under_autocast_and_no_grad():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 33, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (2, 33), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), labels.flatten())
        fused = linear_cross_entropy(hidden, weight, labels, block_rows=16)
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        quiet = linear_cross_entropy(hidden, weight, labels)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, _reference_ce(hidden.detach().flatten(0, 1), weight.detach(), labels.flatten()))
    assert block_rows_for(8192) == 256 and block_rows_for(131072) == 128


def test_forward_with_labels_gives_the_losses_of_the_logits():
    """forward(labels=...) computes lm and every MTP depth's loss without logits; the losses and
    every parameter's gradient equal those of the logits path."""
    config = preset("tiny", mtp_num_layers=2)
    assert config.n_routed_experts > 0
    model = build_model(config, seed=0)  # fp32: grouped_mm has no float64
    x = torch.randint(3, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(x, -1, dims=1)
    labels[0, -1] = IGNORE_INDEX

    def losses_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(x, mtp=True, **kw)
        losses = lm_losses(out, labels)
        sum(losses.values()).backward()
        return out, {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                                 if p.grad is not None}

    out, ref_losses, ref_grads = losses_and_grads()
    assert out.logits is not None and out.losses is None
    out, losses, grads = losses_and_grads(labels=labels)
    assert out.logits is None and not out.mtp_logits and set(losses) == {"lm", "mtp1", "mtp2"} == set(ref_losses)
    for k in losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bucketed_expert_groups_equal_exact_groups():
    """bf16 expert GEMMs on the CPU (the dtype whose kernels oneDNN builds per shape) run on padded,
    bucketed groups; forward and every gradient equal the exact groups' (fp32 accumulation in both)."""
    torch.manual_seed(0)
    experts = GroupedExperts(16, 32, 16)  # bf16 grouped_mm wants 16-byte strides
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    experts.bfloat16()
    counts = torch.tensor([0, 3, 17, 40, 1, 0, 33, 64, 65, 2, 9, 100, 0, 5, 7, 31])
    x = torch.randn(int(counts.sum()), 32, dtype=torch.bfloat16, requires_grad=True)
    calls = []
    original = moe.bucket_rows
    moe.bucket_rows = lambda *a: calls.append(1) or original(*a)
    try:
        experts(x.detach(), counts)
    finally:
        moe.bucket_rows = original
    assert calls  # the bf16 path pads

    padded, padded_counts, placed = bucket_rows(x.detach(), counts)
    assert padded_counts.tolist() == [bucketed_count(c) for c in counts.tolist()]
    assert torch.equal(padded[placed], x.detach())  # every row where `placed` says
    assert padded.abs().sum(-1).eq(0).sum() == padded.shape[0] - x.shape[0]  # the rest are zero rows

    def run():
        experts.zero_grad(set_to_none=True)
        x.grad = None
        y = experts(x, counts)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        return y.detach(), x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    bucketed = run()
    original = moe.bucket_rows
    try:
        moe.bucket_rows = lambda rows, c: (rows, c, torch.arange(rows.shape[0]))
        exact = run()
    finally:
        moe.bucket_rows = original
    for a, b in zip(bucketed, exact):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_bucketed_counts_repeat_and_waste_little():
    sizes = [bucketed_count(c) for c in range(1, 5000)]
    assert all(s >= c and s - c < max(16, c / 8 + 1) for c, s in zip(range(1, 5000), sizes))
    assert bucketed_count(0) == 0
    assert len(set(sizes[200:400])) <= 16  # a step's groups of 200-400 rows share a few shapes


def test_twenty_steps_match_the_unfused_unbucketed_step(tmp_path, monkeypatch):
    """The demo's recipe in miniature (bf16 autocast, Muon): the step's losses over 20 steps equal,
    within bf16 rounding, those of the step computing logits and exact expert groups."""
    from longcat.train.trainer import Trainer

    def run(out):
        trainer = Trainer(make_run(steps=20, precision="bf16", optimizer="muon", eval_every=0), out,
                          batches=SyntheticBatches(TOKENS, 32, 4))
        trainer.train()
        return [loss for _, loss in train_losses(out)]

    fast = run(tmp_path / "fast")
    forward = LongCatForCausalLM.forward
    monkeypatch.setattr(LongCatForCausalLM, "forward", lambda self, *a, labels=None, **kw: forward(self, *a, **kw))
    monkeypatch.setattr(moe, "bucket_rows", lambda rows, c: (rows, c, torch.arange(rows.shape[0])))
    slow = run(tmp_path / "slow")
    assert len(fast) == len(slow) == 20

    for step, (a, b) in enumerate(zip(fast, slow), start=1):
        assert abs(a - b) <= 0.01 * abs(b), (step, a, b)
    assert fast[-1] < fast[0] - 0.1  # it learns
