"""`longcat serve` end to end: a real uvicorn process on 127.0.0.1 serving a tiny model, driven by
the official `openai` client (and raw HTTP where the client would refuse to send something).

At temperature 0 every response must equal the offline `Engine.generate` output for its prompt,
also with 32 clients streaming at once. The fuzz test sends 500+ generated bad requests: each gets
a 4xx (never a 5xx) or a clean stream end, and the server still answers correctly afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai")  # the dev extra: the official client, and httpx with it
httpx = pytest.importorskip("httpx")

from longcat.config import preset  # noqa: E402
from longcat.data import Tokenizer, train_tokenizer  # noqa: E402
from longcat.infer import Engine, SamplingParams  # noqa: E402
from longcat.interop.native import load_model, save_model  # noqa: E402
from longcat.model import build_model  # noqa: E402
from longcat.serve.protocol import longcat_chat_prompt  # noqa: E402

KEY = "test-key"
MAX_MODEL_LEN = 256
WORDS = "the cat sat on the mat, the dog sat on the log. a bird flew over the tree and sang".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model (every feature on) with a trained byte-level tokenizer, saved as a model folder.
    The output head is sharpened so greedy argmax margins are far above float rounding."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    tok = train_tokenizer(docs, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return save_model(model, tmp_path_factory.mktemp("serve") / "tiny-model", tokenizer_json=tok.to_json())


@pytest.fixture(scope="module")
def offline(model_dir):
    """Greedy generation with the offline engine, the reference for every temperature-0 response."""
    model = load_model(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, Tokenizer.load(model_dir), max_seq_len=MAX_MODEL_LEN)

    def generate(prompt, max_tokens, **kw):
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0, **kw)
        return engine.generate([prompt], params)[0]

    generate.engine = engine
    return generate


def start_server(model_dir, log, *extra):
    """`longcat serve` in a child process on a free port (--port 0; it prints the one it got)
    -> (process, base URL). Its stderr goes to the file `log` (a pipe nobody drains could fill up
    and stall the server)."""
    cmd = [sys.executable, "-c", "import sys; from longcat.cli import main; sys.exit(main())", "serve",
           "--model", str(model_dir), "--port", "0", "--dtype", "float32", "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stderr=open(log, "w"), stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 90
    url = None
    while time.time() < deadline and proc.poll() is None:
        if url is None:
            match = re.search(r"http://([\d.]+):(\d+)/v1", log.read_text())
            url = match and f"http://{match.group(1)}:{match.group(2)}"
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start: {log.read_text()}")


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = start_server(model_dir, model_dir.parent / "server.log", "--api-key", KEY, "--max-running", "8", "--max-queue", "32",
                             "--max-model-len", str(MAX_MODEL_LEN), "--prefill-chunk", "16")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return httpx.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kw)


def _metric(url, name) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


# ------------------------------------------------------------------------------------------------
# the openai client


def test_completions_and_chat_equal_offline_generate(server, client, offline):
    rng = random.Random(1)
    for words in (1, 7, 40):
        prompt = _prompt(rng, words)
        ref = offline(prompt, 12, ignore_eos=True)
        r = client.completions.create(model="tiny-model", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == 12 and r.usage.total_tokens == len(ref.prompt_token_ids) + 12
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    ref = offline(longcat_chat_prompt(messages), 10, ignore_eos=True)
    chat = client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == ref.text
    assert chat.usage.prompt_tokens == len(ref.prompt_token_ids) and chat.usage.completion_tokens == 10
    # the template as the tokenizer endpoint sees it
    tokens = _post(server, "/tokenize", {"messages": messages}).json()
    assert tokens["tokens"] == ref.prompt_token_ids and tokens["count"] == len(ref.prompt_token_ids)


def test_streaming_equals_non_streaming_with_usage(client, offline):
    prompt = "the dog sat on the log and"
    ref = offline(prompt, 16, ignore_eos=True)
    chunks = list(client.completions.create(model="tiny-model", prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)

    messages = [{"role": "user", "content": prompt}]
    chat_ref = offline(longcat_chat_prompt(messages), 9, ignore_eos=True)
    stream = client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=9, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat_ref.text


def test_n_choices_seeds_and_stop_strings(client, offline):
    greedy = client.completions.create(model="tiny-model", prompt="a bird", max_tokens=8, temperature=0, n=2,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in greedy.choices] == [0, 1]
    ref = offline("a bird", 8, ignore_eos=True)
    assert greedy.choices[0].text == greedy.choices[1].text == ref.text
    # the prompt counts once, every choice's tokens count
    assert greedy.usage.completion_tokens == 16 and greedy.usage.prompt_tokens == len(ref.prompt_token_ids)

    sampled = [client.completions.create(model="tiny-model", prompt="a bird", max_tokens=12, temperature=1.0,
                                         top_p=0.95, n=2, seed=7, extra_body={"ignore_eos": True, "top_k": 50})
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # seeded
    assert sampled[0].choices[0].text != sampled[0].choices[1].text  # each choice has its own seed

    full = offline("the cat", 20, ignore_eos=True).text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and full[i] != "\ufffd")
    expected = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model="tiny-model", prompt="the cat", max_tokens=20, temperature=0,
                                      stop=[stop, "never appears"], stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in r if c.choices]
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == expected and finish == "stop"


def test_logprobs_are_the_model_distribution(client, offline):
    ref = offline("the mat", 6, ignore_eos=True, logprobs=3)
    r = client.completions.create(model="tiny-model", prompt="the mat", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 6
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert all(len(top) <= 3 and max(top.values()) >= chosen - 1e-6
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)  # greedy: the likeliest


def test_32_concurrent_streams_arriving_at_random_times_equal_offline(server, offline):
    rng = random.Random(3)
    prompts = [_prompt(rng, rng.randint(1, 60)) for _ in range(32)]
    lengths = [rng.randint(4, 24) for _ in prompts]
    delays = [rng.uniform(0, 1.5) for _ in prompts]
    expected = [offline(p, n, ignore_eos=True).text for p, n in zip(prompts, lengths)]
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i):
        await asyncio.sleep(delays[i])
        stream = await client.completions.create(model="tiny-model", prompt=prompts[i], max_tokens=lengths[i],
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    assert asyncio.run(main()) == expected


# ------------------------------------------------------------------------------------------------
# errors


def test_error_envelopes(server, client):
    def error(r, status):
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
        return body

    good = {"model": "tiny-model", "prompt": "the cat", "max_tokens": 4}
    body = error(_post(server, "/v1/completions", {**good, "max_tokens": 300}), 400)
    assert body["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens")
    assert error(_post(server, "/v1/completions", {**good, "temperature": -1}), 400)["param"] == "temperature"
    assert error(_post(server, "/v1/completions", {**good, "n": "2"}), 400)["param"] == "n"
    error(_post(server, "/v1/completions", '{"prompt": "the cat", '), 400)
    error(_post(server, "/v1/completions", b'{"prompt": "\xff\xfe"}'), 400)
    error(_post(server, "/v1/completions", {**good, "prompt": []}), 400)
    error(_post(server, "/v1/completions", good, key=None), 401)
    error(_post(server, "/v1/completions", good, key="wrong"), 401)
    error(_post(server, "/v1/completions", {**good, "model": "gpt-4"}), 404)
    error(_post(server, "/v1/completions", b"x" * (10 << 20)), 413)
    error(httpx.get(server + "/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=10_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-model"]
    assert httpx.get(server + "/version").json()["version"]
    detok = _post(server, "/detokenize", {"tokens": _post(server, "/tokenize", {"prompt": "the cat"}).json()["tokens"]})
    assert detok.json()["prompt"].endswith("the cat")


def test_a_full_queue_answers_429_and_the_rest_complete(server):
    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            body = {"model": "tiny-model", "prompt": "the cat", "max_tokens": 24, "ignore_eos": True}
            return await asyncio.gather(*(http.post(server + "/v1/completions", json=body) for _ in range(56)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(429) >= 1, codes
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in responses if r.status_code == 429)
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in responses if r.status_code == 200)


def test_a_disconnected_stream_is_cancelled_and_frees_its_row(server):
    before = _metric(server, 'longcat_requests_finished_total{finish_reason="cancelled"}')
    body = {"model": "tiny-model", "prompt": "the cat", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
    deadline = time.time() + 20
    while time.time() < deadline:
        cancelled = _metric(server, 'longcat_requests_finished_total{finish_reason="cancelled"}')
        if cancelled > before and _metric(server, "longcat_requests_running") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the cancelled stream never left the batch")
    assert _metric(server, "longcat_generation_tokens_total") > 0
    assert _metric(server, "longcat_time_to_first_token_seconds_count") > 0
    # the telemetry sampler: a live process holds more than the interpreter and torch's bare minimum
    assert _metric(server, "longcat_process_resident_memory_bytes") > 50 * 2**20


# ------------------------------------------------------------------------------------------------
# fuzz


BAD_VALUES = [None, -1, 0, -10**9, 10**30, 1e308, -0.5, 3.5, float("nan"), "", "x" * 100, "1", True, [], [1, "a"],
              {}, {"a": 1}, [[]], [-1], [10**9], 0.5, 2**63, -(2**63) - 1]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "seed", "stop", "n", "logprobs", "stream", "stream_options",
          "best_of", "echo", "logit_bias", "stop_token_ids", "ignore_eos", "messages", "top_logprobs",
          "max_completion_tokens", "response_format"]


def _fuzz_cases(count: int, seed: int = 0):
    """(path, raw body) pairs: mutated valid bodies, broken JSON, invalid UTF-8, odd shapes."""
    rng = random.Random(seed)
    base = {"/v1/completions": {"model": "tiny-model", "prompt": "the cat", "max_tokens": 3},
            "/v1/chat/completions": {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 3}}
    for i in range(count):
        path = rng.choice(list(base))
        body = dict(base[path])
        kind = i % 8
        if kind in (0, 1, 2):  # one to three fields set to bad values
            for _ in range(kind + 1):
                body[rng.choice(FIELDS)] = rng.choice(BAD_VALUES)
            raw = json.dumps(body, allow_nan=True).encode()
        elif kind == 3:  # JSON cut short or with junk
            raw = json.dumps(body).encode()
            raw = raw[: rng.randint(0, len(raw) - 1)] if rng.random() < 0.7 else raw + b"}{"
        elif kind == 4:  # invalid UTF-8 inside a string, or a whole binary body
            raw = json.dumps(body).encode().replace(b"the cat", bytes([0xff, 0xc3, 0x28])).replace(b"hi", b"\xed\xa0\x80")
            if rng.random() < 0.3:
                raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        elif kind == 5:  # unknown fields and wrong top-level shapes
            body[f"unknown_{rng.randint(0, 99)}"] = rng.choice(BAD_VALUES)
            raw = json.dumps(rng.choice([body, [body], "text", 5, None])).encode()
        elif kind == 6:  # nested garbage in messages / prompt
            if path == "/v1/chat/completions":
                body["messages"] = rng.choice([[{"role": "robot", "content": "x"}], [{"content": "x"}], ["hi"],
                                               [{"role": "user", "content": [{"type": "image_url"}]}],
                                               [{"role": "user", "content": 5}]])
            else:
                body["prompt"] = rng.choice([[[]], [1, [2]], [[1], "a"], [-5], [300, 1], {"text": "x"}])
            raw = json.dumps(body).encode()
        else:  # valid shape, extreme but legal values: must run and end cleanly
            body.update(temperature=rng.choice([0, 2.0]), top_p=rng.choice([1e-9, 1.0]), seed=rng.randrange(2**63),
                        top_k=rng.choice([-1, 1, 10**6]), stream=rng.random() < 0.5, max_tokens=rng.randint(1, 4),
                        stop=rng.choice([None, ["\n"], "zzzz"]), presence_penalty=2, repetition_penalty=2)
            if path == "/v1/completions" and rng.random() < 0.3:
                body["prompt"] = rng.choice(["", [0], [2, 2, 2]])
            raw = json.dumps(body).encode()
        yield path, raw


def test_fuzzed_requests_get_4xx_or_a_clean_end_and_the_server_stays_correct(server, offline):
    statuses = []
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.Client(timeout=60, headers=headers) as http:
        for path, raw in _fuzz_cases(520):
            r = http.post(server + path, content=raw)
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, raw[:200], r.text)
            if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
                frames = [line for line in r.text.split("\n\n") if line]
                assert frames[-1] == "data: [DONE]" and not any('"error"' in f for f in frames), r.text
            elif r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] >= 1
            else:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        # disconnects mid-stream, and a huge body
        for _ in range(6):
            body = {"model": "tiny-model", "prompt": "the cat", "max_tokens": 100, "stream": True}
            with http.stream("POST", server + "/v1/completions", json=body) as r:
                next(r.iter_lines())
        assert http.post(server + "/v1/completions", content=b"[" * (10 << 20)).status_code == 413
    assert statuses.count(200) >= 30 and sum(400 <= s < 500 for s in statuses) >= 400
    assert httpx.get(server + "/health").status_code == 200
    ref = offline("the cat sat", 10, ignore_eos=True)
    r = _post(server, "/v1/completions", {"prompt": "the cat sat", "max_tokens": 10, "temperature": 0,
                                          "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == ref.text


def test_serve_command_refuses_bad_options(model_dir, capsys):
    from longcat.cli import main

    assert main(["serve", "--model", str(model_dir), "--nproc", "2"]) == 2
    assert "--nproc 2: serving from several processes is not available yet" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--max-running", "0"]) == 2
    assert "--max-running must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--max-model-len", "99999", "--dtype", "float32"]) == 2
    assert "beyond the model's max_position_embeddings" in capsys.readouterr().err


def test_bench_serve_reports_latencies_throughput_and_the_comparison(server, capsys):
    from longcat.cli import main

    args = ["bench", "serve", "--url", server, "--api-key", KEY, "--num-prompts", "6", "--input-len", "6",
            "--output-len", "5", "--concurrency", "3", "--warmup", "0", "--slo-ttft-ms", "60000",
            "--slo-tpot-ms", "60000", "--compare-sequential"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for run in ("sequential", "load"):
        s = report[run]
        assert s["completed"] == 6 and s["failed"] == 0 and s["output_tokens"] >= 6 * 2  # lengths 2.5-7.5
        assert s["goodput"] == pytest.approx(s["request_throughput"])  # generous SLOs: every request is good
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert 0 < s[key]["p50"] <= s[key]["p99"]
        assert s["ttft_ms"]["mean"] <= s["e2el_ms"]["mean"]
    assert report["sequential"]["output_tokens"] == report["load"]["output_tokens"]  # the same requests
    assert report["comparison"]["throughput_ratio"] > 0 and report["comparison"]["ttft_bound_ms"] > 0
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "== speed target ==" in text and "TTFT" in text and "output throughput, load / one at a time" in text
    assert main(["bench", "serve", "--num-prompts", "2"]) == 2
    assert "give exactly one" in capsys.readouterr().err


def test_an_engine_failure_ends_streams_with_an_error_frame_and_health_turns_503(model_dir):
    """In process (the ASGI app without a socket), with a decode step that fails."""
    from longcat.infer.scheduler import Scheduler, SchedulerConfig
    from longcat.serve.app import Server, ServerSettings, create_app

    engine = Engine(load_model(model_dir, dtype=torch.float32).eval(), Tokenizer.load(model_dir), max_seq_len=64)
    server = Server(Scheduler(engine, SchedulerConfig(max_running=2)), ServerSettings(model_name="m"))

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    server.scheduler._batch._step = broken
    app = create_app(server)
    server.start()

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            assert (await http.get("/health")).status_code == 200
            body = {"prompt": "the cat", "max_tokens": 8, "stream": True, "ignore_eos": True}
            r = await http.post("/v1/completions", json=body)
            frames = [f for f in r.text.split("\n\n") if f]
            assert r.status_code == 200 and frames[-1] == "data: [DONE]"
            error = json.loads(frames[-2].removeprefix("data: "))["error"]
            assert "device lost" in error["message"] and error["code"] == 503
            assert (await http.get("/health")).status_code == 503
            r = await http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2})
            assert r.status_code == 503 and "engine has stopped" in r.json()["error"]["message"]

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_the_tokenizer_configs_chat_template_is_used_when_present(model_dir, tmp_path):
    """A model folder whose tokenizer_config.json has a chat_template: the prompt is that template,
    rendered (in process: the ASGI app built by the serve command's own builder)."""
    import shutil

    from longcat.cli import build_parser
    from longcat.serve.app import create_app
    from longcat.serve.cli import build_server

    folder = tmp_path / "templated"
    shutil.copytree(model_dir, folder)
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    args = build_parser().parse_args(["serve", "--model", str(folder), "--dtype", "float32", "--max-model-len", "64"])
    server = build_server(args)
    app = create_app(server)
    server.start()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    rendered = "<system>be brief\n<user>the cat\n<assistant>"
    tok = Tokenizer.load(folder)
    ids = tok.encode(rendered, allow_special=True)
    model = load_model(folder, dtype=torch.float32).eval()
    offline = Engine(model, tok, max_seq_len=64).generate([ids], SamplingParams(max_new_tokens=6, temperature=0,
                                                                                 ignore_eos=True))[0]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            r = await http.post("/tokenize", json={"messages": messages})
            assert r.json()["tokens"] == ids
            r = await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6,
                                                               "temperature": 0, "ignore_eos": True})
            assert r.json()["choices"][0]["message"]["content"] == offline.text
            assert r.json()["usage"]["prompt_tokens"] == len(ids)

    try:
        asyncio.run(main())
    finally:
        server.stop()
