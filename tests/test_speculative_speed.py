"""What makes the compiled greedy speculative step cheap, checked directly: a steady-state step is
one graph call whose acceptance runs on the device, so the host reads the device once per step
(the emitted tokens and the accepted counts, in one transfer) and decides whether the step can
fuse from its own counts; the graphs are compiled once and serve every later step and generation.
The tokens stay those of plain greedy decoding. Compiled tests: the model config, batch size (1)
and draft count (3) are those of tests/test_scheduler.py's compiled speculative test, so inductor's
cache serves both, and contexts stay below the tiny preset's index_topk (past it sparse
attention runs eagerly)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, SamplingParams
from longcat.infer import engine as engine_module
from longcat.infer.speculative import MTPDrafter
from longcat.model import build_model, lm_losses

pytestmark = pytest.mark.slow

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler for torch.compile (inductor) on this machine")

K = 3  # drafts per step, over 2 MTP heads: the last head also runs on


@pytest.fixture(scope="module")
def trained(arithmetic):
    """One decoder layer and two MTP heads, trained for a few seconds on arithmetic sequences, so
    the drafts are right often but not always."""
    torch.manual_seed(0)
    model = build_model(preset("tiny", num_layers=1, mtp_num_layers=2), seed=0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        x = arithmetic(16, 25, gen)
        loss = sum(lm_losses(model(x[:, :-1], mtp=True), x[:, 1:]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def compiled(trained):
    """One compiled engine for the tests here: its graphs are compiled once."""
    return Engine(trained, compile=True, speculative=K)


# every way a tensor's value reaches the host
_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")


def _watch_steps(monkeypatch) -> list[tuple[bool, int]]:
    """Record (fused, device reads) for every decode step of the engine from now on."""
    steps, reads, fused = [], [0], [False]
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    greedy_step, step = MTPDrafter.greedy_step, engine_module._Generation._step

    def watched_greedy_step(self, *args, **kwargs):
        rows = greedy_step(self, *args, **kwargs)
        fused[0] = rows is not None
        return rows

    def watched_step(self):
        reads[0], fused[0] = 0, False
        out = step(self)
        steps.append((fused[0], reads[0]))
        return out

    monkeypatch.setattr(MTPDrafter, "greedy_step", watched_greedy_step)
    monkeypatch.setattr(engine_module._Generation, "_step", watched_step)
    return steps


@needs_compiler
def test_fused_step_reads_the_device_once_and_compiles_nothing_after_the_first_generation(
        trained, compiled, arithmetic, monkeypatch):
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(3)
    first, second = [p[:n] for p, n in zip(arithmetic(2, 8, gen).tolist(), (6, 8))]
    engine = compiled
    engine.generate([first], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))  # compiles
    graphs = counters["stats"]["unique_graphs"]
    # another prompt length, more tokens and a larger cache: the same graphs serve
    params = SamplingParams(max_new_tokens=13, temperature=0, ignore_eos=True)
    steps = _watch_steps(monkeypatch)
    [result] = engine.generate([second], params)
    monkeypatch.undo()
    assert counters["stats"]["unique_graphs"] == graphs
    fused = [reads for is_fused, reads in steps if is_fused]
    assert len(fused) >= len(steps) - 1 >= 2  # every step after the first after prefill
    assert set(fused) == {1}
    assert result.token_ids == Engine(trained).generate([second], params)[0].token_ids
    assert result.num_accepted_tokens > 0


@needs_compiler
def test_fused_step_drafts_and_accepts_as_the_separate_eager_calls(trained, compiled, arithmetic):
    """The bookkeeping the fused step does on the device (tokens, positions, hidden states,
    frontiers) leaves the next steps' drafts exactly those of the eager path's separate draft and
    verify calls: same tokens, same drafts accepted."""
    gen = torch.Generator().manual_seed(5)
    prompt = arithmetic(1, 8, gen)[0].tolist()
    params = SamplingParams(max_new_tokens=13, temperature=0, ignore_eos=True)
    [result] = compiled.generate([prompt], params)
    assert result.token_ids == Engine(trained).generate([prompt], params)[0].token_ids
    eager = Engine(trained, speculative=K).generate([prompt], params)[0]
    assert eager.num_accepted_tokens > 0
    assert (result.num_draft_tokens, result.num_accepted_tokens) == (eager.num_draft_tokens,
                                                                     eager.num_accepted_tokens)


@needs_compiler
def test_step_costs_time_the_graphs_of_a_fused_step(trained, compiled):
    """`longcat bench infer --model` reports where a speculative step's time goes from these."""
    from longcat.bench.common import Timer
    from longcat.bench.infer_bench import speculative_step_costs

    engine = compiled
    costs = speculative_step_costs(engine, K, 12, Timer("cpu"), reps=3)
    assert min(costs["plain"], costs["verify"], costs["fused"]) > 0
    assert costs["draft"] == pytest.approx(costs["fused"] - costs["verify"])
    # no fused graph: the eager engine, or a context past index_topk (sparse attention, eager)
    assert speculative_step_costs(Engine(trained), K, 12, Timer("cpu")) is None
    assert speculative_step_costs(engine, K, trained.config.index_topk, Timer("cpu")) is None
