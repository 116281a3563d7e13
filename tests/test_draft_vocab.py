"""MTP drafts over a reduced draft vocabulary (`draft_vocab`: the first N token ids): greedy output
stays exactly plain greedy decoding, eager and compiled (the fused speculative step); sampled
tokens keep plain sampling's distribution (q is 0 outside the subset); the default follows the
tokenizer; bad values are refused in one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, GenerationError, SamplingParams
from longcat.infer.speculative import DRAFT_VOCAB, MTPDrafter, default_draft_vocab
from longcat.model import build_model, lm_losses

GREEDY = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler for torch.compile (inductor) on this machine")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds contention on the shared cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _prompts(arithmetic, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [p[:n] for p, n in zip(arithmetic(4, 12, gen).tolist(), (11, 5, 8, 3))]


def _acceptance(results) -> float:
    return sum(r.num_accepted_tokens for r in results) / sum(r.num_draft_tokens for r in results)


def test_greedy_output_is_plain_greedy_for_any_draft_vocabulary(trained, arithmetic):
    """`trained` (conftest) saw tokens 10..489 only: drafts from the first id alone are always
    wrong (acceptance 0), N = vocab is the full vocabulary (0), and a cut at 300 through the
    prompts' continuations accepts fewer; the tokens never change."""
    V = trained.config.vocab_size
    prompts = _prompts(arithmetic)
    engine = Engine(trained)
    assert engine.draft_vocab == V  # no tokenizer: nothing says the low ids are the frequent ones
    plain = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    for k in (1, 3):  # 3 drafts > 2 heads: the last head also runs on
        full = engine.generate(prompts, GREEDY, speculative=k, draft_vocab=0)
        assert [r.token_ids for r in full] == plain
        for vocab, acceptance in ((1, 0.0), (V, _acceptance(full))):
            spec = engine.generate(prompts, GREEDY, speculative=k, draft_vocab=vocab)
            assert [r.token_ids for r in spec] == plain, (k, vocab)
            assert _acceptance(spec) == acceptance, (k, vocab)
        # a cut through the continuations: some drafts fall outside, fewer are accepted
        cut = engine.generate(prompts, GREEDY, speculative=k, draft_vocab=300)
        assert [r.token_ids for r in cut] == plain
        assert 0 < _acceptance(cut) < _acceptance(full)
    # the engine's default applies when a call gives none; penalties read the padded draft logits
    penalised = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=0.3)
    spec = Engine(trained, speculative=2, draft_vocab=300).generate(prompts, penalised)
    assert [r.token_ids for r in spec] == [r.token_ids for r in engine.generate(prompts, penalised)]
    assert 0 < _acceptance(spec) < 1


def test_the_server_scheduler_drafts_over_the_engine_draft_vocabulary(trained, arithmetic):
    from longcat.infer.scheduler import Scheduler, SchedulerConfig

    prompts = _prompts(arithmetic)
    plain = [r.token_ids for r in Engine(trained).generate(prompts, GREEDY)]
    acceptance = {}
    for vocab in (0, 300):
        scheduler = Scheduler(Engine(trained, speculative=2, draft_vocab=vocab), SchedulerConfig(max_running=2))
        results = {}
        for i, p in enumerate(prompts):
            scheduler.submit(p, GREEDY, lambda out, i=i: results.__setitem__(i, out.result) if out.result else None)
        for _ in range(500):
            scheduler.step()
            if not scheduler.has_work():
                break
        assert [results[i].token_ids for i in range(len(prompts))] == plain, vocab
        acceptance[vocab] = _acceptance(results.values())
    assert 0 < acceptance[300] < acceptance[0]


@torch.no_grad()
def _filtered(model, ids, top_k: int, temperature: float) -> torch.Tensor:
    """Plain sampling's distribution of the token after `ids` (top-k, then temperature): (V,)."""
    logits = model(torch.tensor([ids]), mtp=False, indexer_loss=False).logits[0, -1].float()
    kept = logits.topk(top_k).indices
    probs = torch.zeros_like(logits)
    probs[kept] = (logits[kept] / temperature).softmax(-1)
    return probs


def test_sampled_tokens_keep_plain_sampling_distribution(trained):
    """Many seeded rows of one prompt, one draft per step from the first 257 ids, a cut through
    the continuations the model samples (254 then 256 mostly, 258 or 470 too): the joint distribution of
    the first two tokens (the second drafted and verified) is plain sampling's, computed exactly."""
    prompt = list(range(230, 254, 2))  # counting by two: 254 and 256 come next
    top_k, temperature, rows = 3, 1.5, 3000
    params = [SamplingParams(max_new_tokens=2, temperature=temperature, top_k=top_k, seed=s, ignore_eos=True)
              for s in range(rows)]
    greedy = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    engine = Engine(trained, speculative=1, draft_vocab=257)
    results = engine.generate([prompt] * (rows + 1), params + [greedy])
    assert results[-1].token_ids == Engine(trained).generate([prompt], greedy)[0].token_ids  # a greedy row, mixed in
    results = results[:-1]
    drafted = sum(r.num_draft_tokens for r in results)
    assert 0 < sum(r.num_accepted_tokens for r in results) < drafted  # both branches of the rule ran

    V = trained.config.vocab_size
    first = _filtered(trained, prompt, top_k, temperature)
    expected = torch.zeros(V, V)
    for t in first.nonzero().flatten().tolist():
        expected[t] = first[t] * _filtered(trained, prompt + [t], top_k, temperature)
    assert expected[:, 257:].sum() > 0.2  # the cut matters: plain sampling often goes beyond it
    observed = torch.zeros(V, V)
    for r in results:
        observed[r.token_ids[0], r.token_ids[1]] += 1 / rows
    assert observed[expected == 0].sum() == 0
    # a cell of probability p has a standard error of sqrt(p (1 - p) / rows) <= 0.0092
    assert (observed - expected).abs().max() < 0.035


def test_default_draft_vocabulary_follows_the_tokenizer(trained):
    import tokenizers

    from longcat.data import train_tokenizer
    from longcat.data.tokenizer import Tokenizer

    ours = train_tokenizer(["the cat sat on the mat, the dog sat on the log."] * 40, vocab_size=300,
                           show_progress=False)
    assert default_draft_vocab(8192, ours) == DRAFT_VOCAB
    assert default_draft_vocab(1000, ours) == 1000
    assert Engine(trained, ours).draft_vocab == min(trained.config.vocab_size, DRAFT_VOCAB)
    # a foreign BPE (its own special tokens, so no promise about its id order): the full vocabulary
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    hf.train_from_iterator(["the cat sat on the mat"] * 20,
                           tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"]))
    foreign = Tokenizer(hf)
    assert default_draft_vocab(8192, foreign) == 8192
    assert default_draft_vocab(8192, None) == 8192


def test_bad_draft_vocabularies_are_refused(trained, tmp_path, capsys):
    V = trained.config.vocab_size
    for bad in (-1, V + 1):
        with pytest.raises(GenerationError, match=rf"draft_vocab must be between 1 and the vocabulary size {V}"):
            Engine(trained, draft_vocab=bad)
        with pytest.raises(GenerationError, match="draft_vocab must be between"):
            Engine(trained).generate([[5, 6]], GREEDY, speculative=1, draft_vocab=bad)
    for bad in (2.5, "300", True):
        with pytest.raises(GenerationError, match="draft_vocab must be an integer token count"):
            Engine(trained, draft_vocab=bad)
    with pytest.raises(GenerationError, match="draft_vocab must be between"):
        MTPDrafter(trained, Engine(trained).runner, 1, 1, 16, 8, draft_vocab=V + 1)

    from longcat.cli import main
    from longcat.interop.native import save_model

    save_model(trained, tmp_path / "model")
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt-ids", "10,12,14", "--max-new-tokens", "6",
            "--temperature", "0", "--speculative", "2", "--json"]
    assert main(args + ["--draft-vocab", str(V + 5)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"draft_vocab must be between 1 and the vocabulary size {V}" in err
    # the benchmark refuses before it builds or times anything
    assert main(["bench", "infer", "--draft-vocab", "-1"]) == 2
    assert "--draft-vocab must be >= 0" in capsys.readouterr().err
    assert main(["bench", "infer", "--model", str(tmp_path / "model"), "--draft-vocab", str(V + 5)]) == 2
    assert f"the model has {V} token ids" in capsys.readouterr().err
    assert main(args + ["--draft-vocab", "300"]) == 0
    assert main(args) == 0
    restricted, full = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert restricted["token_ids"] == full["token_ids"]


# ------------------------------------------------------------------------------------------------
# compiled: the fused greedy step (one graph: draft chain over the draft vocabulary, verify, accept)


K = 3  # drafts per step, over 2 MTP heads, as tests/test_speculative_speed.py (inductor's cache serves both)


@pytest.fixture(scope="module")
def one_layer(arithmetic):
    """One decoder layer and two MTP heads, trained for a few seconds on arithmetic sequences."""
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


@pytest.mark.slow
@needs_compiler
def test_compiled_fused_step_over_a_draft_vocabulary_gives_plain_greedy_output(one_layer, arithmetic, monkeypatch):
    """One compiled generation with drafts from the first 200 ids (a cut through the prompt's
    continuation, 174 counting up by 3): the tokens of plain greedy decoding, the steady-state steps as the one fused
    graph, and the eager engine's acceptance at that draft vocabulary, below the full vocabulary's
    (so the cut reached the graph's draft chain)."""
    fused = []
    greedy_step = MTPDrafter.greedy_step

    def watched(self, *args, **kwargs):
        rows = greedy_step(self, *args, **kwargs)
        fused.append(rows is not None)
        return rows

    monkeypatch.setattr(MTPDrafter, "greedy_step", watched)
    prompt = _prompts(arithmetic)[0]
    eager = Engine(one_layer, speculative=K)
    plain = eager.generate([prompt], GREEDY, speculative=0)[0].token_ids
    full, cut = (eager.generate([prompt], GREEDY, draft_vocab=v)[0] for v in (0, 200))
    assert 0 < cut.acceptance_rate < full.acceptance_rate
    fused.clear()
    spec = Engine(one_layer, compile=True, speculative=K, draft_vocab=200).generate([prompt], GREEDY)[0]
    assert spec.token_ids == plain
    assert sum(fused) >= 2
    assert spec.acceptance_rate == cut.acceptance_rate
