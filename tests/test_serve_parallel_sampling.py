"""Parallel sampling (`n` > 1): a prompt is prefilled once and its n choices continue from copies of
its cache row, each with its own seed. Engine level (`Scheduler.submit_choices`, no HTTP) and end to
end (a real uvicorn process on 127.0.0.1 and the official `openai` client, as tests/test_serve.py).

What must hold: every choice equals what it was before the fork existed (temperature 0: the
offline `Engine.generate` output; seeded: choice i the output of seed + i on its own), and the
prompt is computed once (the scheduler's prompt-token counters, also on /metrics).
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, SamplingParams
from longcat.infer.scheduler import CANCELLED, QueueFull, Scheduler, SchedulerConfig
from longcat.model import build_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import KEY, MAX_MODEL_LEN, _metric, model_dir, offline, start_server  # noqa: E402,F401


@pytest.fixture(scope="module")
def tiny():
    """Every feature on (n-grams, sparse attention, MTP, YaRN); a sharpened head for clear argmaxes."""
    torch.manual_seed(0)
    model = build_model(preset("tiny"), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def _prompt(length: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Collect:
    """on_event callbacks of n choices -> their outputs and results."""

    def __init__(self, n: int) -> None:
        self.outputs = {i: [] for i in range(n)}
        self.callbacks = [lambda out, i=i: self.outputs[i].append(out) for i in range(n)]

    def results(self):
        return [outs[-1].result for outs in self.outputs.values()]


def _run(scheduler, max_steps=2000):
    for _ in range(max_steps):
        if not scheduler.has_work():
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


GREEDY = SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True)


# ------------------------------------------------------------------------------------------------
# engine level


def test_choices_prefill_once_and_equal_offline_generate_beside_other_requests(tiny):
    prompt, other = _prompt(37), _prompt(9, seed=2)
    expected = Engine(tiny).generate([prompt], GREEDY)[0].token_ids
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=6, prefill_chunk=8))
    beside = _Collect(1)
    scheduler.submit(other, GREEDY, beside.callbacks[0])
    scheduler.step()  # the other request is decoding while the family prefills in chunks of 8
    got = _Collect(3)
    choices = scheduler.submit_choices(prompt, [GREEDY] * 3, got.callbacks)
    assert [c.prompt_token_ids for c in choices] == [prompt] * 3
    _run(scheduler)
    assert [r.token_ids for r in got.results()] == [expected] * 3
    assert beside.results()[0].token_ids == Engine(tiny).generate([other], GREEDY)[0].token_ids
    stats = scheduler.stats()
    # each prompt went through the model once; the two other choices got copies of its cache row
    assert stats.prompt_tokens_computed == len(prompt) + len(other)
    assert stats.prompt_tokens_copied == 2 * len(prompt)
    assert stats.running == stats.waiting == stats.reserved_tokens == 0


def test_seeded_choices_keep_their_own_seeds_penalties_and_logprobs(tiny):
    """Choice i samples from the shared prompt logits with its own generator: its tokens are those of
    seed + i run alone (the derivation the server used before forking), penalties and logprobs too."""
    prompt = _prompt(21, seed=3)
    params = [SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=7 + i,
                             ignore_eos=True, frequency_penalty=0.3, repetition_penalty=1.2, logprobs=2)
              for i in range(3)]
    offline = Engine(tiny)
    expected = [offline.generate([prompt], p)[0] for p in params]
    assert len({tuple(e.token_ids) for e in expected}) == 3  # the seeds do make the choices differ
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=4, prefill_chunk=64))
    got = _Collect(3)
    scheduler.submit_choices(prompt, params, got.callbacks)
    _run(scheduler)
    for r, e, outs in zip(got.results(), expected, got.outputs.values()):
        assert r.token_ids == e.token_ids
        assert [lp.logprob for lp in r.logprobs] == pytest.approx([lp.logprob for lp in e.logprobs], abs=1e-4)
        assert sum(len(o.token_ids) for o in outs) == len(r.token_ids)  # streamed pieces add up
    assert scheduler.stats().prompt_tokens_computed == len(prompt)


def test_speculative_choices_equal_plain_offline(trained, arithmetic):
    """MTP rows: each choice's drafter state (prompt hidden states, frontier) is its own copy."""
    prompt = arithmetic(1, 13, torch.Generator().manual_seed(4))[0].tolist()
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    expected = Engine(trained).generate([prompt], params)[0].token_ids
    scheduler = Scheduler(Engine(trained, speculative=2), SchedulerConfig(max_running=4, prefill_chunk=5))
    got = _Collect(3)
    scheduler.submit_choices(prompt, [params] * 3, got.callbacks)
    _run(scheduler)
    results = got.results()
    assert [r.token_ids for r in results] == [expected] * 3
    assert all(r.num_accepted_tokens > 0 for r in results)
    assert scheduler.stats().prompt_tokens_computed == len(prompt)


def test_a_family_is_admitted_whole_split_to_the_caps_and_queued_all_or_nothing(tiny):
    prompt = _prompt(6)
    expected = Engine(tiny).generate([prompt], GREEDY)[0].token_ids  # 6 + 14 = 20 cache tokens a choice
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=3, max_queue=4, prefill_chunk=64))
    first = _Collect(1)
    scheduler.submit(_prompt(6, seed=5), SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True),
                     first.callbacks[0])
    scheduler.step()
    got = _Collect(3)
    scheduler.submit_choices(prompt, [GREEDY] * 3, got.callbacks)
    with pytest.raises(QueueFull, match="max_queue"):  # 3 queued + 2 > 4: none of the two is queued
        scheduler.submit_choices(prompt, [GREEDY] * 2, [lambda o: None] * 2)
    scheduler.step()
    stats = scheduler.stats()
    # two rows are free, the family needs three: it waits whole rather than starting in part
    assert stats.running == 1 and stats.waiting == 3 and stats.prefilling == 0
    _run(scheduler)
    assert [r.token_ids for r in got.results()] == [expected] * 3

    # more choices than rows (or than the cache-token cap) form families that fit, each prefilled once
    split = Scheduler(Engine(tiny), SchedulerConfig(max_running=2, prefill_chunk=64))
    got = _Collect(5)
    split.submit_choices(prompt, [GREEDY] * 5, got.callbacks)
    _run(split)
    assert [r.token_ids for r in got.results()] == [expected] * 5
    assert split.stats().prompt_tokens_computed == 3 * len(prompt)  # families of 2, 2 and 1
    capped = Scheduler(Engine(tiny), SchedulerConfig(max_running=4, max_cache_tokens=45, prefill_chunk=64))
    got = _Collect(3)
    capped.submit_choices(prompt, [GREEDY] * 3, got.callbacks)
    capped.step()
    assert capped.stats().running == 2 and capped.stats().reserved_tokens == 40  # the copies count: 2 x 20
    _run(capped)
    assert [r.token_ids for r in got.results()] == [expected] * 3
    assert capped.stats().prompt_tokens_computed == 2 * len(prompt)


def test_cancelled_choices_leave_and_the_others_go_on(tiny):
    prompt = _prompt(40, seed=6)
    expected = Engine(tiny).generate([prompt], GREEDY)[0].token_ids
    scheduler = Scheduler(Engine(tiny), SchedulerConfig(max_running=4, prefill_chunk=8))
    blocker = _Collect(1)
    scheduler.submit(_prompt(3), SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
                     blocker.callbacks[0])
    scheduler.step()
    got = _Collect(3)
    choices = scheduler.submit_choices(prompt, [GREEDY] * 3, got.callbacks)
    scheduler.step()
    assert scheduler.stats().prefilling == 3
    scheduler.cancel(choices[0])  # the choice whose prefill the others share: the prefill goes on
    scheduler.step()
    assert got.outputs[0][-1].error == CANCELLED and scheduler.stats().prefilling == 2
    _run(scheduler)
    assert [r.token_ids for r in got.results()[1:]] == [expected] * 2
    assert scheduler.stats().prompt_tokens_copied == len(prompt)  # one copy: the cancelled choice has none

    # every choice of a waiting family cancelled: the family leaves the queue unprefilled
    scheduler.submit(_prompt(3), SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
                     lambda o: None)
    scheduler.submit(_prompt(3), SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
                     lambda o: None)
    scheduler.step()
    computed = scheduler.stats().prompt_tokens_computed
    got = _Collect(3)
    choices = scheduler.submit_choices(prompt, [GREEDY] * 3, got.callbacks)  # 3 > the 2 free rows: waits
    scheduler.step()
    assert scheduler.stats().waiting == 3
    for c in choices:
        scheduler.cancel(c)
    _run(scheduler)
    assert all(outs[-1].error == CANCELLED for outs in got.outputs.values())
    assert scheduler.stats().prompt_tokens_computed == computed


@pytest.mark.slow
def test_compiled_speculative_scheduler_forks_choices():
    """The compiled step (its row buckets pad the batch) over forked MTP rows, through the fused greedy
    speculative step. The config, 2 rows and 3 drafts are those of tests/test_infer_compiled.py's
    fused test, whose compiled graphs are then inductor cache hits here (compilation is what takes
    the time); prompt and output stay below index_topk, where the step would turn eager."""
    model = build_model(preset("tiny", num_layers=1, mtp_num_layers=2), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.eval()
    prompt = _prompt(10, seed=8)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    expected = Engine(model).generate([prompt], params)[0].token_ids
    scheduler = Scheduler(Engine(model, speculative=3, compile=True), SchedulerConfig(max_running=2))
    fused, graph = [0], scheduler.engine.runner._speculate

    def counted(*args, **kwargs):
        fused[0] += 1
        return graph(*args, **kwargs)

    scheduler.engine.runner._speculate = counted
    got = _Collect(2)
    scheduler.submit_choices(prompt, [params] * 2, got.callbacks)
    _run(scheduler)
    assert [r.token_ids for r in got.results()] == [expected] * 2
    assert fused[0] > 0 and scheduler.stats().prompt_tokens_computed == len(prompt)


# ------------------------------------------------------------------------------------------------
# end to end: uvicorn + the openai client


def _serve(model_dir, name, *extra):
    proc, url = start_server(model_dir, model_dir.parent / f"{name}.log", "--api-key", KEY,
                             "--max-model-len", str(MAX_MODEL_LEN), "--prefill-chunk", "16", *extra)
    return proc, url


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = _serve(model_dir, "parallel", "--max-running", "8", "--max-queue", "32")
    yield url
    _stop(proc)


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _counters(url):
    return _metric(url, "longcat_prompt_tokens_computed_total"), _metric(url, "longcat_prompt_tokens_copied_total")


def test_n_choices_share_one_prefill_streaming_or_not(server, offline):
    client = _client(server)
    prompt = "the dog sat on the log and the cat sat on the mat"
    ref = offline(prompt, 10, ignore_eos=True)
    L = len(ref.prompt_token_ids)
    for stream in (False, True):
        computed, copied = _counters(server)
        r = client.completions.create(model="tiny-model", prompt=prompt, max_tokens=10, temperature=0, n=3,
                                      stream=stream, stream_options={"include_usage": True} if stream else None,
                                      extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                     for i in range(3)]
            usage = chunks[-1].usage
        else:
            texts, usage = [c.text for c in r.choices], r.usage
        assert texts == [ref.text] * 3, stream
        assert usage.prompt_tokens == L and usage.completion_tokens == 30
        # the prompt ran through the model once; the other two choices got copies of its cache row
        assert _counters(server) == (computed + L, copied + 2 * L), stream


def test_seeded_choice_i_equals_seed_plus_i_alone(server):
    client = _client(server)
    messages = [{"role": "user", "content": "a bird flew over the tree"}]
    kw = dict(model="tiny-model", messages=messages, max_tokens=12, temperature=1.0, top_p=0.9,
              extra_body={"ignore_eos": True})
    alone = [client.chat.completions.create(seed=11 + i, **kw).choices[0].message.content for i in range(3)]
    stream = client.chat.completions.create(seed=11, n=3, stream=True, **kw)
    texts = [""] * 3
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == alone and len(set(alone)) > 1


def test_speculative_server_splits_families_to_its_rows_and_refuses_what_cannot_queue(model_dir, offline):
    """--speculative (MTP rows forked), --max-running 2 (n = 3 runs as families of 2 and 1),
    --max-queue 4 (n = 5 can never queue: 429, nothing started)."""
    proc, url = _serve(model_dir, "parallel-speculative", "--speculative", "2", "--max-running", "2",
                       "--max-queue", "4")
    try:
        client = _client(url)
        ref = offline("the cat sat on", 12, ignore_eos=True)
        L = len(ref.prompt_token_ids)
        computed, copied = _counters(url)
        r = client.completions.create(model="tiny-model", prompt="the cat sat on", max_tokens=12, temperature=0,
                                      n=3, extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == [ref.text] * 3
        assert _counters(url) == (computed + 2 * L, copied + L)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny-model", prompt="the cat", max_tokens=4, n=5)
        assert _metric(url, "longcat_requests_waiting") == 0
        again = client.completions.create(model="tiny-model", prompt="the cat sat on", max_tokens=12,
                                          temperature=0, n=2, extra_body={"ignore_eos": True})
        assert [c.text for c in again.choices] == [ref.text] * 2
    finally:
        _stop(proc)
