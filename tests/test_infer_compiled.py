"""The compiled decode step (`Engine(compile=True)`: the model's own decode forward wrapped by
torch.compile): same results as the eager step and as full recomputation, on every feature,
including the switch to the eager step when sparse attention starts selecting tokens. Compiling
takes tens of seconds per graph on a cold cache (CI's case); the tests share one config and graph
shapes so that inductor's cache serves most of them, and the model has one decoder layer (every
feature is in it: both attention sublayers, dense FFNs, the MoE, n-grams, LSA, MTP), which halves
the code each graph compiles."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, SamplingParams
from longcat.infer.step import DecodeStep, row_bucket
from longcat.model import LatentCache, build_model

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
# Every model here has this config: graphs compiled for one test are inductor cache hits in the others
# (and in tests/test_scheduler.py's compiled test). Two MTP heads: drafts deeper than the first.
CONFIG = dict(num_layers=1, mtp_num_layers=2)
# inductor compiles C++ on CPU
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler for torch.compile (inductor) on this machine")


@pytest.fixture(scope="module")
def tiny():
    """Every feature on: n-gram embedding, sparse attention (index_topk 24), MTP, YaRN."""
    model = build_model(preset("tiny", **CONFIG), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # clear argmax margins for greedy comparisons
    return model.eval()


def _prompts(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _full_recompute(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]), mtp=False, indexer_loss=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _count_graph_calls(runner: DecodeStep) -> list[int]:
    calls, graph = [0], runner._decode

    def counted(*args, **kwargs):
        calls[0] += 1
        return graph(*args, **kwargs)

    runner._decode = counted
    return calls


@needs_compiler
def test_compiled_step_matches_the_eager_step_on_every_feature(tiny):
    """Logits, hidden states and every cache entry (latents, rope keys, indexer keys) written by
    one compiled step equal the eager step's: rows at different positions, 4 tokens per row; the
    same for a draft window (the MTP head over its cache sublayer, the output head on its end).
    4 tokens per row is the verify of 3 drafts: the fused speculative test below runs this graph."""
    c = tiny.config
    g = torch.Generator().manual_seed(3)
    B, P = 2, 17  # contexts stay within index_topk = 24: the dense phase of LSA
    ids = torch.randint(3, c.vocab_size, (B, P), generator=g)
    caches = []
    with torch.inference_mode():
        for _ in range(2):
            cache = LatentCache(c, B, 32)
            tiny(ids, cache=cache, mtp=True, indexer_loss=False)
            caches.append(cache)
        positions = torch.tensor([[11, 12, 13, 14], [14, 15, 16, 17]])  # each row from its own cached length
        step = torch.randint(3, c.vocab_size, (B, 4), generator=g)
        history = ids.gather(1, positions[:, :1] - torch.tensor([2, 1]))  # the n-gram state
        compiled, eager = DecodeStep(tiny, compile=True), DecodeStep(tiny)
        calls = _count_graph_calls(compiled)
        outs = [runner.forward(step, positions, cache, history, last_only=False)
                for runner, cache in zip((compiled, eager), caches)]
        mtp_ids = step.flip(1)  # any tokens: both steps read the same
        drafts = [runner.draft(1, mtp_ids, outs[1][1], positions, cache, history)
                  for runner, cache in zip((compiled, eager), caches)]
    assert calls[0] == 1
    for a, b in [*zip(*outs), *zip(*drafts)]:
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for name in ("c_kv", "k_rope", "index_k"):
        torch.testing.assert_close(getattr(caches[0], name), getattr(caches[1], name), atol=2e-5, rtol=1e-4)


@needs_compiler
def test_a_batch_runs_padded_to_its_bucket(tiny):
    """3 rows in a 4-row allocation run as the 4-row graph (the padded row writes only the spare
    row): results and the 3 rows' cache entries equal the eager step's on a 3-row cache."""
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 65]
    c = tiny.config
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, c.vocab_size, (3, 9), generator=g)
    with torch.inference_mode():
        wide, ref_cache = LatentCache(c, 4, 32), LatentCache(c, 3, 32)
        for cache in (wide.narrow(3), ref_cache):
            tiny(ids, cache=cache, mtp=False, indexer_loss=False)
        wide.c_kv[:, 3].normal_(0, 50)  # the spare row: finite garbage
        positions = torch.tensor([[9], [9], [9]])
        step = torch.randint(3, c.vocab_size, (3, 1), generator=g)
        compiled = DecodeStep(tiny, compile=True)
        assert compiled.rows_for(3, wide.narrow(3)) == 4 and compiled.rows_for(3, ref_cache) == 3
        calls = _count_graph_calls(compiled)
        padded = compiled.forward(step, positions, wide.narrow(3), ids[:, 7:9])
        ref = DecodeStep(tiny).forward(step, positions, ref_cache, ids[:, 7:9])
    assert calls[0] == 1
    for a, b in zip(padded, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for name in ("c_kv", "k_rope", "index_k"):
        torch.testing.assert_close(getattr(wide, name)[:, :3], getattr(ref_cache, name), atol=2e-5, rtol=1e-4)
    engine = Engine(tiny, compile=True)
    engine.generate(_prompts([4, 5, 6]), GREEDY)
    assert engine._cache.c_kv.shape[1] == 4  # the engine allocates the bucket's rows


@needs_compiler
def test_a_bucket_compiles_once_for_every_cache_length_and_allocation(tiny):
    """The cache span (every step) and the allocation's length and row count (the engine grows
    its cache for a longer generation or a larger batch) are dynamic from the first call: the first
    generation compiles one graph for all its steps, and a later one of the same batch size with a
    longer prompt, more tokens and a larger cache (longer, and with the rows a larger batch grew it
    to) compiles nothing new (each compile costs tens of seconds). Batches of 2 and 4: with one
    layer, the indexer keys of a 1-row allocation are a size-1 dimension, which torch.compile
    specializes (0/1 specialization)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs other tests compiled are in dynamo's cache of the step functions
    engine = Engine(tiny, compile=True)
    runs = [([5, 3], 4, 1), ([6, 7, 2, 4], 5, 1), ([11, 8], 9, 0)]  # prompt lengths, new tokens, graphs expected
    for seed, (lengths, n, graphs) in enumerate(runs):  # contexts stay below index_topk (24)
        prompts = _prompts(lengths, seed=seed)
        before, allocated = counters["stats"]["unique_graphs"], engine._cache
        results = engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
        assert counters["stats"]["unique_graphs"] - before == graphs
        for result, prompt in zip(results, prompts):
            assert result.token_ids == _full_recompute(tiny, prompt, n)
    assert allocated is not engine._cache and engine._cache.c_kv.shape[1] == 4  # re-allocated, 4 rows


@needs_compiler
def test_compiled_engine_equals_full_recomputation_and_switches_for_sparse_attention(tiny):
    """Greedy decoding with the compiled step equals rerunning the whole sequence; rows of different
    lengths decode together and leave as they finish; once a context passes index_topk the step
    runs eagerly (data-dependent selection), with no change in the results."""
    engine = Engine(tiny, compile=True)
    calls = _count_graph_calls(engine.runner)
    prompts = _prompts([12, 7, 2])
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (20, 9, 14)]
    results = engine.generate(prompts, params)  # row 0 reaches 32 > 24 tokens: sparse from there
    assert calls[0] > 0
    for prompt, p, result in zip(prompts, params, results):
        assert result.token_ids == _full_recompute(tiny, prompt, p.max_new_tokens)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    assert [r.token_ids for r in engine.generate(prompts, sampled)] == \
        [r.token_ids for r in Engine(tiny).generate(prompts, sampled)]


@needs_compiler
def test_fused_greedy_speculative_step_equals_plain(tiny):
    """All-greedy rows in the steady state run draft chain and verify as one graph (3 drafts over
    2 MTP heads: the last head runs on); rows leave at different steps, a context passes
    index_topk (the step falls back to the separate, eager calls), and the tokens equal plain
    greedy decoding."""
    prompts = _prompts([10, 5], seed=7)
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (16, 7)]
    engine = Engine(tiny, compile=True, speculative=3)
    calls, graph = [0], engine.runner._speculate

    def counted(*args, **kwargs):
        calls[0] += 1
        return graph(*args, **kwargs)

    engine.runner._speculate = counted
    spec = engine.generate(prompts, params)
    assert calls[0] > 0
    assert [r.token_ids for r in spec] == [r.token_ids for r in Engine(tiny).generate(prompts, params)]
    assert all(r.acceptance_rate is not None for r in spec)


@needs_compiler
def test_compiled_step_reads_the_models_current_weights(tiny):
    """The weights are inputs of the graphs: in-place updates and replaced tensors are seen at the
    next step; a model moved to another dtype after compiling is refused with a message."""
    from longcat.infer import GenerationError

    model = build_model(preset("tiny", **CONFIG), seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    engine, reference = Engine(model, compile=True), Engine(model)
    prompts = _prompts([6, 3])
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == \
        [r.token_ids for r in reference.generate(prompts, GREEDY)]
    with torch.no_grad():
        model.layers[0].mlps[0].down_proj.weight.mul_(-3.0)
    model.lm_head.weight.data = model.lm_head.weight.data.flip(0).clone()  # re-allocated
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == \
        [r.token_ids for r in reference.generate(prompts, GREEDY)]
    model.to(torch.float64)
    with pytest.raises(GenerationError, match="make a new Engine"):
        engine.generate(prompts, GREEDY)


@needs_compiler
def test_generate_command_with_compile(tiny, tmp_path, capsys):
    import json

    from longcat.cli import main
    from longcat.interop.native import save_model

    save_model(tiny, tmp_path / "model")
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt-ids", "5,17,42,9", "--max-new-tokens", "12",
            "--temperature", "0", "--ignore-eos", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 12
