"""Inference engine: cached decoding against full recomputation, batching, sampling, speculative
decoding with the MTP heads, stop conditions, errors and the `longcat generate` command."""

from __future__ import annotations

import json

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, GenerationError, SamplingParams
from longcat.infer.sampling import BatchSampler
from longcat.infer.speculative import greedy_accept, rejection_accept
from longcat.model import LatentCache, build_model

GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds contention on the shared cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _sharpen(model, factor=8.0):
    """Random weights give near-uniform logits; a larger head gives greedy comfortable margins."""
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    """Every feature on: n-gram embedding, sparse attention (budget 24 tokens), MTP, YaRN."""
    torch.manual_seed(0)
    return _sharpen(build_model(preset("tiny"), seed=0))


def _prompts(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _full_recompute(model, prompt, steps):
    """Greedy decoding that reruns the whole sequence every step (no cache at all)."""
    ids, logits = list(prompt), []
    for _ in range(steps):
        out = model(torch.tensor([ids]), mtp=False, indexer_loss=False).logits[0, -1]
        logits.append(out)
        ids.append(int(out.argmax()))
    return ids[len(prompt):], torch.stack(logits)


class CharTokenizer:
    """Token t >= 3 is the letter chr(97 + t % 26); 0, 1, 2 are pad, bos, eos."""

    eos_id, bos_id = 2, 1

    def encode(self, text):
        return [ord(c) - 97 + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids if t > 2)


# ------------------------------------------------------------------------------------------------
# exactness


def test_cached_decoding_equals_full_recomputation_with_sparse_attention(tiny, monkeypatch):
    import longcat.model.attention as attention

    sparse_calls = []
    original = attention.select_positions

    def counting(scores, positions, config, **kw):
        selection = original(scores, positions, config, **kw)
        # a decode step whose query keeps fewer than all of its keys
        sparse_calls.append(scores.shape[1] == 1 and bool((~selection.valid).sum() == 0)
                            and int(positions.max()) >= config.index_topk)
        return selection

    monkeypatch.setattr(attention, "select_positions", counting)
    prompts = _prompts([30, 7, 2])  # 30 + 24 > index_topk = 24: LSA selects tokens while decoding
    results = Engine(tiny, prefill_chunk=8).generate(prompts, GREEDY)
    assert any(sparse_calls), "decode never ran the sparse selection over cached indexer keys"
    for prompt, result in zip(prompts, results):
        expected, _ = _full_recompute(tiny, prompt, GREEDY.max_new_tokens)
        assert result.token_ids == expected
        assert result.finish_reason == "length" and len(result.token_ids) == 24


def test_decode_step_matches_the_full_forward_on_every_feature(tiny):
    """model.decode (absorbed attention over the cache) and decode_mtp against model.forward without
    a cache (expanded attention) over the same sequences: rows at different positions, 3 tokens per
    row, sparse attention selecting."""
    c = tiny.config
    g = torch.Generator().manual_seed(3)
    B, P = 2, 34  # past index_topk = 24: LSA picks tokens
    ids = torch.randint(3, c.vocab_size, (B, P), generator=g)
    positions = torch.tensor([[20, 21, 22], [30, 31, 32]])  # rows at their own positions
    step = torch.randint(3, c.vocab_size, (B, 3), generator=g)
    with torch.inference_mode():
        cache = LatentCache(c, B, 64)
        prefill = tiny(ids, cache=cache, mtp=True, indexer_loss=False).pre_norm_hidden
        history = ids.gather(1, positions[:, :1] - torch.tensor([2, 1]))  # the n-gram state
        cache.begin(positions)
        logits, hidden = tiny.decode(step, positions, cache, history, last_only=False)
        # the MTP head from the position before the step (it reads the step's first token) on
        before = positions[:, :1] - 1
        prev = torch.cat([prefill.gather(1, before.unsqueeze(-1).expand(-1, -1, c.hidden_size)), hidden[:, :2]], 1)
        mtp_positions = torch.cat([before, positions[:, :2]], 1)
        cache.begin(mtp_positions)
        _, normed_mtp = tiny.decode_mtp(1, step, prev, mtp_positions, cache, ids.gather(1, before - torch.tensor([1, 0])))
        for b in range(B):
            start = int(positions[b, 0])
            seq = torch.cat([ids[b, :start], step[b]]).unsqueeze(0)
            ref = tiny(seq, mtp=True, indexer_loss=False)
            torch.testing.assert_close(logits[b], ref.logits[0, -3:], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(hidden[b], ref.pre_norm_hidden[0, -3:], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(tiny.head(normed_mtp[b]), ref.mtp_logits[0][0, -3:], atol=2e-5, rtol=1e-4)


def test_moe_over_the_chosen_experts_equals_the_grouped_experts(tiny):
    """The decode path's MoE (each (token, slot) pair through its own expert, identity slots
    borrowing an expert at gate 0) against the sorted, grouped-GEMM path on the same routing."""
    moe = tiny.layers[0].mlp
    x = torch.randn(6, tiny.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        routing = moe.router(x)
        grouped, _ = moe(x)  # 6 tokens x 3 slots > 8 experts: the grouped GEMM
        identity = (routing.weights * (routing.indices >= moe.num_experts)).sum(-1, keepdim=True)
        assert (routing.indices >= moe.num_experts).any()  # zero-computation slots are exercised
        torch.testing.assert_close(x * identity + moe.chosen_experts(x, routing), grouped, atol=2e-5, rtol=1e-4)


def test_batched_equals_one_at_a_time_greedy_and_seeded(tiny):
    prompts = _prompts([13, 1, 26, 5])
    engine = Engine(tiny)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    for params in (GREEDY, sampled):
        together = engine.generate(prompts, params)
        alone = [engine.generate([p], params)[0] for p in prompts]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_chunked_prefill_and_cache_reuse_do_not_change_results(tiny):
    prompts = _prompts([40, 9])
    reference = Engine(tiny, prefill_chunk=512).generate(prompts, GREEDY)
    engine = Engine(tiny, prefill_chunk=5)
    engine.generate(_prompts([3, 3, 3], seed=9), GREEDY)  # leaves other sequences in the cache
    again = engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in again] == [r.token_ids for r in reference]


def test_rows_leave_the_batch_when_done(tiny):
    prompts = _prompts([6, 11, 3])
    lengths = [3, 20, 9]
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    results = Engine(tiny).generate(prompts, params)
    for prompt, n, result in zip(prompts, lengths, results):
        assert result.token_ids == _full_recompute(tiny, prompt, n)[0]


def test_cache_holds_the_latent_size_per_token(tiny):
    engine = Engine(tiny)
    engine.generate(_prompts([10]), GREEDY)
    cache = engine._cache
    per_token = cache.nbytes() / (cache.c_kv.shape[1] * cache.max_len)
    c = tiny.config
    expected = (2 * c.num_layers + c.mtp_num_layers) * (c.kv_lora_rank + c.qk_rope_head_dim) + c.num_layers * c.index_head_dim
    assert per_token == expected * 4 == LatentCache.bytes_per_token(c, dtype_bytes=4, with_mtp=True)


# ------------------------------------------------------------------------------------------------
# sampling


def test_same_seed_same_output_and_different_seeds_differ(tiny):
    engine = Engine(tiny)
    prompts = _prompts([8])

    def run(seed):
        params = SamplingParams(max_new_tokens=20, temperature=1.5, seed=seed, ignore_eos=True)
        return engine.generate(prompts, params)[0].token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_filters_that_leave_one_token_equal_greedy(tiny):
    engine = Engine(tiny)
    prompts = _prompts([8, 15])
    greedy = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        sampled = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=2.0, seed=0,
                                                          ignore_eos=True, **params))
        assert [r.token_ids for r in sampled] == greedy, params


def test_logit_processing_matches_a_plain_reference():
    torch.manual_seed(0)
    V = 50
    params = [
        SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=1.3, min_p=0.2),
        SamplingParams(temperature=0),
    ]
    prompts = [[1, 2, 3], [4], [5, 6], [7]]
    sampler = BatchSampler(params, prompts, V, "cpu")
    generated = [[3, 9, 9], [], [11], [7, 7]]
    sampler.record(generated)
    logits = torch.randn(4, 1, V) * 3
    out = sampler.process(logits)[:, 0]

    # row 0: penalties (transformers' repetition rule, OpenAI's presence/frequency), then T and top-k
    x = logits[0, 0].clone()
    for t in {1, 2, 3, 9}:
        x[t] = x[t] / 1.3 if x[t] > 0 else x[t] * 1.3
    x[3] -= 0.5 + 0.25
    x[9] -= 0.5 + 0.5
    x = x / 0.7
    kth = x.topk(5).values[-1]
    x[x < kth] = float("-inf")
    torch.testing.assert_close(out[0], x)
    # row 1: the smallest set of likeliest tokens with mass >= 0.6
    probs = logits[1, 0].softmax(-1)
    order = probs.argsort(descending=True)
    need = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    assert set(torch.isfinite(out[1]).nonzero().flatten().tolist()) == set(order[:need].tolist())
    # row 2: tokens with probability >= 0.2 * max (temperature first)
    probs = (logits[2, 0] / 1.3).softmax(-1)
    assert set(torch.isfinite(out[2]).nonzero().flatten().tolist()) == set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    # row 3: greedy, penalties off: untouched
    torch.testing.assert_close(out[3], logits[3, 0])


def test_penalties_change_decoding(tiny):
    engine = Engine(tiny)
    prompts = _prompts([4])
    plain = engine.generate(prompts, GREEDY)[0].token_ids
    assert len(set(plain)) < len(plain)  # the sharpened random model repeats itself
    penalised = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True,
                                                        frequency_penalty=1e4))[0].token_ids
    assert len(set(penalised)) == len(penalised)


def test_logprobs_are_the_model_distribution(tiny):
    prompt = _prompts([9])[0]
    result = Engine(tiny).generate([prompt], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True,
                                                            logprobs=3))[0]
    _, logits = _full_recompute(tiny, prompt, 6)
    logp = logits.log_softmax(-1)
    for j, lp in enumerate(result.logprobs):
        assert lp.token_id == result.token_ids[j]
        assert abs(lp.logprob - logp[j, lp.token_id].item()) < 1e-4
        assert [t for t, _ in lp.top] == logp[j].topk(3).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy picks the likeliest


# ------------------------------------------------------------------------------------------------
# stopping, streaming, errors


def test_stop_tokens_stop_strings_and_streaming(tiny):
    engine = Engine(tiny, CharTokenizer())
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    full = engine.generate(["hello"], params)[0]
    assert full.text == CharTokenizer().decode(full.token_ids)
    # a stop token: generation ends on it, it is in token_ids but not in the text
    stop_token = full.token_ids[5]
    first = full.token_ids.index(stop_token)
    r = engine.generate(["hello"], SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[stop_token]))[0]
    assert r.finish_reason == "stop" and r.stop_reason == stop_token
    assert r.token_ids == full.token_ids[: first + 1]
    assert r.text == CharTokenizer().decode(full.token_ids[:first])
    # a stop string: the text ends right before it
    stop = full.text[7:10]
    cut = full.text.index(stop)
    events = list(engine.stream(["hello"], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop])))
    result = events[-1].result
    assert result.finish_reason == "stop" and result.stop_reason == stop
    assert result.text == full.text[:cut]
    assert "".join(e.text for e in events) == result.text
    assert [t for e in events for t in e.token_ids] == result.token_ids
    assert result.token_ids == full.token_ids[: len(result.token_ids)]


def test_end_of_text_stops_unless_ignored(tiny):
    prompt = _prompts([5])[0]
    full = Engine(tiny).generate([prompt], GREEDY)[0].token_ids
    # pretend the model's 4th token is end-of-text
    tiny.config.eos_token_id, saved = full[3], tiny.config.eos_token_id
    try:
        r = Engine(tiny).generate([prompt], SamplingParams(max_new_tokens=24, temperature=0))[0]
    finally:
        tiny.config.eos_token_id = saved
    assert r.finish_reason == "stop" and r.token_ids == full[: full.index(full[3]) + 1]


def test_one_generation_at_a_time_and_an_abandoned_stream_frees_the_engine(tiny):
    engine = Engine(tiny)
    stream = engine.stream(_prompts([5]), GREEDY)
    next(stream)
    with pytest.raises(GenerationError, match="already generating"):
        engine.generate(_prompts([3]), GREEDY)
    stream.close()
    assert engine.generate(_prompts([5]), GREEDY)[0].token_ids == Engine(tiny).generate(_prompts([5]), GREEDY)[0].token_ids


def test_prompt_that_does_not_fit_is_refused_or_truncated_on_request(tiny):
    engine = Engine(tiny, max_seq_len=64)
    long_prompt = _prompts([60])[0]
    with pytest.raises(GenerationError, match="context holds 64"):
        engine.generate([long_prompt], GREEDY)
    r = engine.generate([long_prompt], GREEDY, truncate_prompt=True)[0]
    assert r.prompt_token_ids == long_prompt[-40:] and len(r.token_ids) == 24
    # no prompt fits beside 64 new tokens in 64 positions: truncation cannot help, and is not offered
    for truncate in (False, True):
        with pytest.raises(GenerationError, match="asks for 64 new tokens") as refused:
            engine.generate([[5, 6]], SamplingParams(max_new_tokens=64, temperature=0), truncate_prompt=truncate)
        assert "truncat" not in str(refused.value)
    with pytest.raises(GenerationError, match="tokenizer"):
        engine.generate(["text"], GREEDY)
    with pytest.raises(GenerationError, match="vocabulary"):
        engine.generate([[1, 10_000]], GREEDY)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=0)
    no_mtp = build_model(preset("tiny", mtp_num_layers=0), seed=0)
    with pytest.raises(GenerationError, match="MTP"):
        Engine(no_mtp).generate([[5, 6]], GREEDY, speculative=2)


# ------------------------------------------------------------------------------------------------
# speculative decoding


def test_speculative_greedy_equals_plain_decoding(trained, arithmetic):
    gen = torch.Generator().manual_seed(5)
    prompts = [p[:n] for p, n in zip(arithmetic(4, 12, gen).tolist(), (11, 5, 8, 3))]
    engine = Engine(trained)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    plain = engine.generate(prompts, params)
    rates = []
    for k in (1, 2, 3):  # 3 drafts > 2 heads: the last head also runs on
        spec = engine.generate(prompts, params, speculative=k)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain], k
        rates += [r.acceptance_rate for r in spec]
    assert all(r.acceptance_rate is None for r in plain)
    # the drafts are mostly right, and not always: both branches of the rule ran
    assert 0.3 < sum(rates) / len(rates) < 1.0 and max(rates) > 0.9
    # penalties at verify position j count the drafts before j, exactly as plain decoding would
    penalised = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=0.3)
    spec = engine.generate(prompts, penalised, speculative=2)
    assert [r.token_ids for r in spec] == [r.token_ids for r in engine.generate(prompts, penalised)]
    assert sum(r.num_accepted_tokens for r in spec) > 0


def test_speculative_on_the_full_featured_model(tiny):
    prompts = _prompts([30, 4])
    plain = Engine(tiny).generate(prompts, GREEDY)
    spec = Engine(tiny, speculative=2, prefill_chunk=7).generate(prompts, GREEDY)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True,
                             repetition_penalty=1.2, frequency_penalty=0.5, logprobs=2)
    engine = Engine(tiny, speculative=2)
    first, again = engine.generate(prompts, sampled), engine.generate(prompts, sampled)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert all(len(r.logprobs) == len(r.token_ids) == 12 for r in first)
    # with penalties, greedy speculative decoding still equals plain decoding (drafts count at verify)
    penalised = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.5,
                               presence_penalty=0.3)
    assert [r.token_ids for r in engine.generate(prompts, penalised)] == \
        [r.token_ids for r in Engine(tiny).generate(prompts, penalised)]


def test_greedy_accept_counts_leading_hits():
    targets = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 7], [5, 0, 7], [1, 6, 7]])
    assert greedy_accept(targets, drafts).tolist() == [3, 1, 0]


def test_rejection_rule_keeps_the_target_distribution():
    """Draft from q, accept/reject against p: the emitted tokens are distributed as p."""
    g = torch.Generator().manual_seed(0)
    N, V, k = 200_000, 5, 2
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2] * 5])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.6, 0.1, 0.1, 0.1, 0.1]])
    P, Q = p.expand(N, -1, -1), q.expand(N, -1, -1)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(k)], 1)
    u = torch.rand(N, k, generator=g)
    noise = torch.empty(N, V).exponential_(generator=g)
    accepted, following = rejection_accept(P, Q, drafts, u, noise)
    first = torch.where(accepted >= 1, drafts[:, 0], following)
    second_rows = accepted >= 1  # a second token exists when the first draft was accepted
    second = torch.where(accepted >= 2, drafts[:, 1], following)[second_rows]
    freq1 = torch.bincount(first, minlength=V).float() / N
    freq2 = torch.bincount(second, minlength=V).float() / second.numel()
    assert (freq1 - p[0]).abs().max() < 0.006
    assert (freq2 - p[1]).abs().max() < 0.008
    # acceptance of draft 1 is sum_x min(p, q)
    assert abs((accepted >= 1).float().mean() - torch.minimum(p[0], q[0]).sum()) < 0.006


# ------------------------------------------------------------------------------------------------
# command line


def test_generate_command_json_stream_and_run_directory(tiny, tmp_path, capsys):
    from longcat.cli import main
    from longcat.data import train_tokenizer
    from longcat.interop.native import save_model
    from longcat.interop.runs import COMPLETE

    tok = train_tokenizer(["the cat sat on the mat, the dog sat on the log."] * 40, vocab_size=300,
                          show_progress=False)
    step = tmp_path / "run" / "checkpoints" / "step_5"
    save_model(tiny, step / "model", tokenizer_json=tok.to_json())
    (step / COMPLETE).write_text("step 5\n")

    args = ["generate", "--model", str(tmp_path / "run"), "--prompt", "the cat", "--max-new-tokens", "8",
            "--temperature", "0", "--ignore-eos"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("text", "token_ids", "ttft_s", "tokens_per_s", "acceptance_rate"):
        assert key in out
    assert len(out["token_ids"]) == 8 and out["acceptance_rate"] is None
    assert out["text"] == tok.decode(out["token_ids"])

    assert main(args + ["--json", "--speculative", "2"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == out["token_ids"] and 0 <= spec["acceptance_rate"] <= 1

    assert main(args + ["--stream"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == "the cat" + out["text"] + "\n"
    assert "8 tokens" in streamed.err
    assert "telemetry: peak RSS" in streamed.err  # the sampler ran alongside the generation

    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt-ids", "1,2,3", "--max-new-tokens",
                 "5000"]) == 2
    assert "context holds" in capsys.readouterr().err
    missing_device = "cuda:4096" if torch.cuda.is_available() else "cuda"
    assert main(args + ["--device", missing_device]) == 2
    assert f"--device {missing_device}: " in capsys.readouterr().err
    assert main(args + ["--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a model")
    assert main(["generate", "--model", str(a_file), "--prompt-ids", "1,2"]) == 2
    assert "is a file; give a model directory" in capsys.readouterr().err


def _vma_field(address: int, field: str) -> int | None:
    """`field` (e.g. THPeligible) of the memory mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def test_compiled_mode_weights_live_in_huge_page_memory_where_the_os_offers_it(tmp_path):
    """The compiled mode moves the weights into memory advised for transparent huge pages (they
    stream every step; 4 KB pages cost a TLB miss each and stop the prefetchers): the tensors stay
    the model's own, with the same values, and save and load like any other."""
    import sys
    from pathlib import Path

    from longcat import load, save_hf
    from longcat.infer.step import huge_page_weights

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform != "linux" or not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this machine")
    model = build_model(preset("small"), seed=0).eval()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    assert huge_page_weights(model)
    assert all(p is params[name] for name, p in model.named_parameters())  # the model's own tensors
    assert _vma_field(model.lm_head.weight.data_ptr(), "THPeligible") == 1
    assert all(t.data_ptr() % 64 == 0 for t in model.state_dict().values())
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    save_hf(model, tmp_path / "m")
    for name, value in load(tmp_path / "m").state_dict().items():
        assert torch.equal(value, expected[name]), name
