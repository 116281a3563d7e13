"""The compiled decode step (`Engine(compile=True)`): same results as FastDecoder and as full
recomputation, on every feature, including the switch to FastDecoder when sparse attention starts
selecting tokens and the fallback when compilation fails. Compiling takes tens of seconds."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, SamplingParams
from longcat.infer.compiled import CompiledDecoder
from longcat.infer.decode import FastDecoder
from longcat.model import LatentCache, build_model

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
# inductor compiles C++ on CPU; without a compiler the engine falls back (tested below) but the
# compiled path itself cannot be tested
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler for torch.compile (inductor) on this machine")


@pytest.fixture(scope="module")
def tiny():
    """Every feature on: n-gram embedding, sparse attention (index_topk 24), MTP, YaRN."""
    model = build_model(preset("tiny"), seed=0)
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


def _count_graph_calls(runner: CompiledDecoder) -> list[int]:
    calls, graph = [0], runner._graph

    def counted(*args, **kwargs):
        calls[0] += 1
        return graph(*args, **kwargs)

    runner._graph = counted
    return calls


@needs_compiler
def test_compiled_step_matches_fast_decoder_on_every_feature(tiny):
    """Logits, hidden states and every cache entry (latents, rope keys, indexer keys) written by
    one compiled step equal FastDecoder's: rows at different positions, 3 tokens per row."""
    c = tiny.config
    g = torch.Generator().manual_seed(3)
    B, P = 2, 17  # contexts stay within index_topk = 24: the dense phase of LSA
    ids = torch.randint(3, c.vocab_size, (B, P), generator=g)
    caches = []
    with torch.inference_mode():
        for _ in range(2):
            cache = LatentCache(c, B, 32)
            tiny(ids, cache=cache, mtp=False, indexer_loss=False)
            caches.append(cache)
        positions = torch.tensor([[11, 12, 13], [17, 18, 19]])  # each row from its own cached length
        step = torch.randint(3, c.vocab_size, (B, 3), generator=g)
        history = ids.gather(1, positions[:, :1] - torch.tensor([2, 1]))  # the n-gram state
        compiled = CompiledDecoder(tiny)
        calls = _count_graph_calls(compiled)
        ours = compiled.forward(step, positions, caches[0], history, last_only=False)
        ref = FastDecoder(tiny).forward(step, positions, caches[1], history, last_only=False)
        emb = tiny.embed(step)  # the MTP head over its own cache sublayer, and the output head
        heads = [runner.mtp(1, emb, ref[1], positions, cache)
                 for runner, cache in zip((compiled, FastDecoder(tiny)), caches)]
        logits = [runner.head(heads[0][1][:, -1]) for runner in (compiled, FastDecoder(tiny))]
    assert calls[0] == 1 and compiled.failed is None
    torch.testing.assert_close(ours[0], ref[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1], ref[1], atol=2e-5, rtol=1e-4)
    for a, b in zip(*heads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits[0], logits[1], atol=2e-5, rtol=1e-4)
    for name in ("c_kv", "k_rope", "index_k"):
        torch.testing.assert_close(getattr(caches[0], name), getattr(caches[1], name), atol=2e-5, rtol=1e-4)


@needs_compiler
def test_a_batch_runs_padded_to_its_bucket_without_touching_the_padding_rows(tiny):
    """3 rows in a 4-row allocation run as the 4-row graph: results equal FastDecoder's on a 3-row
    cache, and the spare row (garbage here) is read but never written. Without spare rows in the
    allocation the step runs unpadded, with the same results."""
    from longcat.infer.compiled import row_bucket

    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 65]
    c = tiny.config
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, c.vocab_size, (3, 9), generator=g)
    with torch.inference_mode():
        wide, exact, ref_cache = LatentCache(c, 4, 32), LatentCache(c, 3, 32), LatentCache(c, 3, 32)
        for cache in (wide.narrow(3), exact, ref_cache):
            tiny(ids, cache=cache, mtp=False, indexer_loss=False)
        wide.c_kv[:, 3].normal_(0, 50)  # the spare row: finite garbage
        wide.k_rope[:, 3].normal_(0, 50)
        spare = wide.c_kv[:, 3].clone(), wide.k_rope[:, 3].clone()
        positions = torch.tensor([[9], [9], [9]])
        step = torch.randint(3, c.vocab_size, (3, 1), generator=g)
        compiled = CompiledDecoder(tiny)
        assert compiled.rows_for(3, wide.narrow(3)) == 4 and compiled.rows_for(3, exact) == 3
        padded = compiled.forward(step, positions, wide.narrow(3), ids[:, 7:9])
        unpadded = compiled.forward(step, positions, exact, ids[:, 7:9])
        ref = FastDecoder(tiny).forward(step, positions, ref_cache, ids[:, 7:9])
    assert compiled.failed is None
    for ours in (padded, unpadded):
        torch.testing.assert_close(ours[0], ref[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours[1], ref[1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(wide.c_kv[:, :3], ref_cache.c_kv, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(wide.index_k[:, :3], ref_cache.index_k, atol=2e-5, rtol=1e-4)
    assert torch.equal(wide.c_kv[:, 3], spare[0]) and torch.equal(wide.k_rope[:, 3], spare[1])
    engine = Engine(tiny, compile=True)
    engine.generate(_prompts([4, 5, 6]), GREEDY)
    assert engine._cache.c_kv.shape[1] == 4  # the engine allocates the bucket's rows


@needs_compiler
def test_a_bucket_compiles_once_for_every_cache_length_and_allocation(tiny):
    """The cache length (every step) and the allocation's length and row count (the engine grows
    its cache for a longer generation or a larger batch) are dynamic from the first call: the first
    generation compiles one graph for all its steps, and a later one of the same batch size with a
    longer prompt, more tokens and a larger cache compiles nothing new (each compile costs tens of
    seconds)."""
    from torch._dynamo.utils import counters

    engine = Engine(tiny, compile=True)
    runs = [([5], 4, 1), ([6, 7], 5, 1), ([11], 9, 0)]  # prompt lengths, new tokens, graphs expected
    for seed, (lengths, n, graphs) in enumerate(runs):  # contexts stay below index_topk (24)
        prompts = _prompts(lengths, seed=seed)
        before, allocated = counters["stats"]["unique_graphs"], engine._cache
        results = engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
        assert counters["stats"]["unique_graphs"] - before == graphs
        for result, prompt in zip(results, prompts):
            assert result.token_ids == _full_recompute(tiny, prompt, n)
    assert allocated is not engine._cache and engine._cache.c_kv.shape[1] == 2  # re-allocated, 2 rows
    assert engine.runner.failed is None


@needs_compiler
def test_compiled_engine_equals_full_recomputation_and_switches_for_sparse_attention(tiny):
    """Greedy decoding with the compiled step equals rerunning the whole sequence; rows of different
    lengths decode together and leave as they finish; once a context passes index_topk the step
    runs through FastDecoder (data-dependent selection), with no change in the results."""
    engine = Engine(tiny, compile=True)
    calls = _count_graph_calls(engine.runner)
    prompts = _prompts([12, 7, 2])
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (20, 9, 14)]
    results = engine.generate(prompts, params)  # row 0 reaches 32 > 24 tokens: sparse from there
    assert engine.runner.failed is None and calls[0] > 0
    for prompt, p, result in zip(prompts, params, results):
        assert result.token_ids == _full_recompute(tiny, prompt, p.max_new_tokens)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    assert [r.token_ids for r in engine.generate(prompts, sampled)] == \
        [r.token_ids for r in Engine(tiny).generate(prompts, sampled)]


@needs_compiler
def test_compiled_speculative_decoding_equals_plain(tiny):
    prompts = _prompts([9, 4])
    plain = Engine(tiny).generate(prompts, GREEDY)
    spec = Engine(tiny, compile=True, speculative=2).generate(prompts, GREEDY)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.acceptance_rate is not None for r in spec)


def test_a_failed_compilation_warns_and_decodes_without_it(tiny):
    engine = Engine(tiny, compile=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    engine.runner._graph = broken
    prompts = _prompts([5, 3])
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        results = engine.generate(prompts, GREEDY)
    assert engine.runner.failed.startswith("RuntimeError")
    assert [r.token_ids for r in results] == [r.token_ids for r in Engine(tiny).generate(prompts, GREEDY)]


def test_compile_needs_the_fast_path(tiny):
    from longcat.infer import GenerationError

    with pytest.raises(GenerationError, match="fast=False"):
        Engine(tiny, compile=True, fast=False)


@needs_compiler
def test_packed_weights_stay_the_models_own(tiny, tmp_path):
    """The compiled runner re-points the model's tensors into flat buffers: in-place updates are
    seen at once, re-allocated tensors are packed again before the next generation, and the model
    still saves and loads."""
    import longcat

    model = build_model(preset("tiny"), seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    engine, reference = Engine(model, compile=True), Engine(model)
    prompts = _prompts([6, 3])
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == \
        [r.token_ids for r in reference.generate(prompts, GREEDY)]
    with torch.no_grad():
        model.layers[0].mlps[0].down_proj.weight.mul_(-3.0)  # in place: lands in the flat buffer
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == \
        [r.token_ids for r in reference.generate(prompts, GREEDY)]
    model.lm_head.weight.data = model.lm_head.weight.data.flip(0).clone()  # re-allocated
    assert not engine.runner.packed.current()
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == \
        [r.token_ids for r in reference.generate(prompts, GREEDY)]
    assert engine.runner.packed.current() and engine.runner.failed is None
    longcat.save_hf(model, tmp_path / "hf")  # tensors sharing one storage still save
    loaded = longcat.load(tmp_path / "hf")
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


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
