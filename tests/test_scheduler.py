"""The continuous-batching scheduler: requests arriving at different steps, chunked prefill
interleaved with decoding, cancellation and slot reuse, caps, and every request's output equal to
the offline `Engine.generate` of its prompt (greedy, seeded sampling with penalties, speculative,
compiled)."""

from __future__ import annotations

import threading

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, SamplingParams
from longcat.infer.scheduler import CANCELLED, QueueFull, Scheduler, SchedulerConfig
from longcat.model import build_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny():
    """Every feature on (n-grams, sparse attention, MTP, YaRN); a sharpened head for clear argmaxes."""
    torch.manual_seed(0)
    model = build_model(preset("tiny"), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


class CharTokenizer:
    eos_id, bos_id = 2, 1
    prompt_prefix: list[int] = []

    def encode(self, text):
        return [ord(c) - 97 + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids if t > 2)


def _drive(scheduler, prompts, params, arrivals, max_steps=2000):
    """Submit prompt i at step arrivals[i]; step until all finished -> (results, tokens per output)."""
    results, outputs = {}, {i: [] for i in range(len(prompts))}
    params = params if isinstance(params, list) else [params] * len(prompts)
    submitted = 0
    for step in range(max_steps):
        while submitted < len(prompts) and arrivals[submitted] <= step:
            i = submitted

            def on_event(out, i=i):
                outputs[i].append(out)
                if out.result is not None:
                    results[i] = out.result
            scheduler.submit(prompts[i], params[i], on_event)
            submitted += 1
        scheduler.step()
        if submitted == len(prompts) and not scheduler.has_work():
            return [results[i] for i in range(len(prompts))], outputs
    raise AssertionError("the scheduler did not finish")


GREEDY = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)


def test_requests_arriving_at_different_steps_equal_offline_generate(tiny):
    prompts = _prompts([5, 70, 13, 40, 3, 22, 9])
    lengths = [20, 7, 25, 3, 16, 1, 12]
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    offline = Engine(tiny)
    expected = [offline.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=3, prefill_chunk=16))
    results, _ = _drive(scheduler, prompts, params, arrivals=[0, 0, 2, 3, 9, 9, 30])
    assert [r.token_ids for r in results] == expected
    assert [r.finish_reason for r in results] == ["length"] * len(prompts)
    stats = scheduler.stats()
    assert stats.running == stats.waiting == stats.reserved_tokens == 0 and stats.steps > 0


def test_a_long_prompt_is_prefilled_between_decode_steps(tiny):
    """While a 200-token prompt is prefilled in chunks of 16, the running stream gets a token every step."""
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=4, prefill_chunk=16))
    got = []
    scheduler.submit(_prompts([4])[0], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True),
                     lambda out: got.append(len(out.token_ids)))
    scheduler.step()
    scheduler.step()
    long_done = []
    scheduler.submit(_prompts([200], seed=2)[0], GREEDY, lambda out: long_done.append(out))
    for _ in range(13):  # ceil(200 / 16) steps of prefill
        before = len(got)
        scheduler.step()
        assert len(got) == before + 1  # the running stream was not stalled
    assert long_done and long_done[0].token_ids  # the long prompt got its first token in the 13th step


def test_seeded_sampling_penalties_stops_and_logprobs_equal_offline(tiny):
    tok = CharTokenizer()
    prompts = ["hello", "abcabcabcabc", "zebracrossing", "q"]
    params = [
        SamplingParams(max_new_tokens=18, temperature=0.8, top_p=0.9, top_k=40, min_p=0.02, seed=3, ignore_eos=True,
                       repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2),
        SamplingParams(max_new_tokens=18, temperature=1.0, seed=4, ignore_eos=True, logprobs=3),
        SamplingParams(max_new_tokens=18, temperature=0, ignore_eos=True, logprobs=0, frequency_penalty=0.5),
        SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
    ]
    offline = Engine(tiny, tok)
    expected = [offline.generate([p], q)[0] for p, q in zip(prompts, params)]
    # a stop string taken from the greedy text ends that request early, exactly as offline
    stop = expected[3].text[6:8]
    params[3] = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    expected[3] = offline.generate([prompts[3]], params[3])[0]
    assert expected[3].finish_reason == "stop" and expected[3].stop_reason == stop
    scheduler = Scheduler(Engine(tiny, tok), SchedulerConfig(max_running=2, prefill_chunk=8))
    results, outputs = _drive(scheduler, prompts, params, arrivals=[0, 1, 1, 5])
    for r, e, outs in zip(results, expected, outputs.values()):
        assert r.token_ids == e.token_ids and r.text == e.text and r.finish_reason == e.finish_reason
        assert "".join(o.text for o in outs) == e.text  # streamed pieces add up to the text
        if e.logprobs is not None:
            assert [lp.logprob for lp in r.logprobs] == pytest.approx([lp.logprob for lp in e.logprobs], abs=1e-4)
            assert [len(lp.top) for lp in r.logprobs] == [len(lp.top) for lp in e.logprobs]
            assert sum(len(o.logprobs) for o in outs) == len(r.token_ids)


def test_speculative_decoding_in_the_scheduler_equals_plain_offline(trained, arithmetic):
    gen = torch.Generator().manual_seed(5)
    prompts = [p[:n] for p, n in zip(arithmetic(5, 14, gen).tolist(), (11, 5, 8, 3, 14))]
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    expected = [Engine(trained).generate([p], params)[0].token_ids for p in prompts]
    for k in (1, 3):  # 3 drafts > 2 heads: the last head runs on
        scheduler = Scheduler(Engine(trained, speculative=k), SchedulerConfig(max_running=3, prefill_chunk=6))
        results, _ = _drive(scheduler, prompts, params, arrivals=[0, 2, 2, 7, 12])
        assert [r.token_ids for r in results] == expected, k
        assert sum(r.num_accepted_tokens for r in results) > 0


def test_cancel_frees_the_row_and_the_queue_and_caps_hold(tiny):
    prompts = _prompts([6, 6, 6, 6])
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=2, max_queue=2, prefill_chunk=64))
    outs = {i: [] for i in range(4)}
    reqs = [scheduler.submit(p, GREEDY, lambda o, i=i: outs[i].append(o)) for i, p in enumerate(prompts[:2])]
    scheduler.step()
    assert scheduler.stats().running == 2
    reqs += [scheduler.submit(p, GREEDY, lambda o, i=i + 2: outs[i].append(o)) for i, p in enumerate(prompts[2:])]
    with pytest.raises(QueueFull, match="max_queue"):
        scheduler.submit(prompts[0], GREEDY, lambda o: None)
    scheduler.step()
    assert scheduler.stats().running == 2 and scheduler.stats().waiting == 2  # rows are capped
    scheduler.cancel(reqs[0])  # running: its row goes to the next in line
    scheduler.cancel(reqs[3])  # waiting: leaves the queue
    scheduler.step()
    assert outs[0][-1].error == CANCELLED and outs[3][-1].error == CANCELLED
    assert scheduler.stats().running == 2 and scheduler.stats().waiting == 0
    while scheduler.has_work():
        scheduler.step()
    expected = Engine(tiny).generate([prompts[2]], GREEDY)[0].token_ids
    assert outs[2][-1].result.token_ids == expected and outs[1][-1].result is not None

    # the cache-token cap admits the next request only when the reserved tokens allow it (FCFS)
    capped = Scheduler(Engine(tiny), SchedulerConfig(max_running=4, max_cache_tokens=40))
    for p in prompts[:3]:
        capped.submit(p, GREEDY, lambda o: None)  # 26 tokens each
    capped.step()
    stats = capped.stats()
    assert stats.running == 1 and stats.waiting == 2 and stats.reserved_tokens == 26
    assert stats.cache_usage == pytest.approx(26 / 40)


def test_the_run_loop_serves_other_threads_and_a_failure_fails_every_request(tiny):
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=2))
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    done = threading.Event()
    got = []
    scheduler.submit(_prompts([5])[0], GREEDY, lambda o: (got.append(o), o.finished and done.set()))
    assert done.wait(60) and got[-1].result is not None
    assert got[-1].result.token_ids == Engine(tiny).generate([_prompts([5])[0]], GREEDY)[0].token_ids

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    scheduler._batch._step = broken
    failed = threading.Event()
    outs = []
    scheduler.submit(_prompts([5])[0], GREEDY, lambda o: (outs.append(o), o.finished and failed.set()))
    assert failed.wait(60) and "device lost" in outs[-1].error
    thread.join(10)
    assert not scheduler.alive and not thread.is_alive()
    with pytest.raises(Exception, match="stopped"):
        scheduler.submit([5, 6], GREEDY, lambda o: None)


@pytest.fixture(scope="module")
def trained_one_layer(arithmetic):
    """As conftest's `trained` (two MTP heads, a few seconds on arithmetic sequences), with one decoder
    layer: the config of tests/test_infer_compiled.py, whose compiled graphs are then inductor cache
    hits here, and a graph half the size to compile when they are not."""
    from longcat.model import lm_losses

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
def test_compiled_speculative_scheduler_equals_plain_offline(trained_one_layer, arithmetic):
    """The compiled step inside the scheduler, through the fused greedy speculative step, with
    requests joining a running batch and leaving it. One row (bucket 1) and 3 drafts, the shapes of
    tests/test_infer_compiled.py's fused test, keep the compilation, which is what takes the time
    here, to a few graphs."""
    trained = trained_one_layer
    gen = torch.Generator().manual_seed(7)
    prompts = [p[:n] for p, n in zip(arithmetic(3, 12, gen).tolist(), (11, 5, 8))]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    expected = [Engine(trained).generate([p], params)[0].token_ids for p in prompts]
    scheduler = Scheduler(Engine(trained, speculative=3, compile=True), SchedulerConfig(max_running=1))
    drafter, windows = scheduler._batch.drafter, []
    whole_prompt = drafter._draft_window
    drafter._draft_window = lambda depth, batch, width: (windows.append(depth), whole_prompt(depth, batch, width))[1]
    results, _ = _drive(scheduler, prompts, params, arrivals=[0, 3, 3])
    assert [r.token_ids for r in results] == expected
    assert sum(r.num_accepted_tokens for r in results) > 0
    # every request, also one joining after another left, first drafts over its whole prompt at
    # each MTP depth (its frontier starts at 0), not through the fused steady-state step; a prompt
    # of k + D = 5 tokens is one steady window already
    assert windows == [1, 2] * sum(len(p) > 5 for p in prompts)
