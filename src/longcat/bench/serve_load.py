"""`longcat bench serve`: a load generator against any OpenAI-compatible server (ours or another's).

Requests stream from POST /v1/completions with seeded random prompts and output lengths, arriving
as a Poisson process (`--rate`) or as fast as a fixed number of clients allows (`--concurrency`).
Per request: TTFT (send to first text), ITL (between streamed chunks), TPOT = (e2e - TTFT) /
(output tokens - 1), e2e latency. Reported: mean, p50, p90, p99 of each, request and output-token
throughput, and goodput (requests/s meeting --slo-ttft-ms and --slo-tpot-ms), as vLLM's and
SGLang's serving benchmarks define them.

`--compare-sequential` first sends the same requests one at a time, then under the load, and prints
the output-token throughput ratio and the TTFT bound of the speed target (docs/BENCHMARKS.md).
`--model DIR` starts `longcat serve` on a free loopback port for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from his her they this be are or an had not "
         "but what all were when we there can been has more if will one would so no out up into time only "
         "new some could these two may first then do any like my now over such our man me even most made after "
         "also did many before must through back years where much your way well down should because each just "
         "those people how too little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old year off come since "
         "against go came right used take three").split()


@dataclass
class RequestSpec:
    prompt: str
    max_tokens: int
    delay_s: float  # arrival time after the start of the run


@dataclass
class RequestRecord:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def make_requests(num: int, input_len: int, output_len: int, range_ratio: float, rate: float, seed: int):
    """Seeded prompts (random words, about input_len of them), output lengths and Poisson arrivals."""
    rng = random.Random(seed)
    specs, t = [], 0.0
    for _ in range(num):
        words = max(1, round(rng.uniform(input_len * (1 - range_ratio), input_len * (1 + range_ratio))))
        out = max(1, round(rng.uniform(output_len * (1 - range_ratio), output_len * (1 + range_ratio))))
        specs.append(RequestSpec(" ".join(rng.choice(WORDS) for _ in range(words)), out, t))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return specs


async def _one(http, url: str, model: str, spec: RequestSpec, headers: dict) -> RequestRecord:
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    record = RequestRecord(ok=False)
    last, chunks = None, 0
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                record.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return record
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    record.error = data["error"].get("message", "error")
                    return record
                if data.get("usage"):
                    record.prompt_tokens = data["usage"]["prompt_tokens"]
                    record.output_tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as exc:  # a failed request is counted, not fatal to the run
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.e2e_s = time.perf_counter() - start
    record.output_tokens = record.output_tokens or chunks
    record.ok = last is not None
    if not record.ok:
        record.error = "no text streamed"
    return record


async def _run_load(url: str, model: str, specs: list[RequestSpec], concurrency: int | None, api_key: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    limits = httpx.Limits(max_connections=max(concurrency or len(specs), 1) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        start = time.perf_counter()

        async def fire(spec):
            await asyncio.sleep(max(0.0, spec.delay_s - (time.perf_counter() - start)))
            if limit is None:
                return await _one(http, url, model, spec, headers)
            async with limit:
                return await _one(http, url, model, spec, headers)

        records = await asyncio.gather(*(fire(s) for s in specs))
        return records, time.perf_counter() - start


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pct(p):  # linear interpolation, as numpy's default
        x = (len(ordered) - 1) * p / 100
        lo = math.floor(x)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo)

    return {"mean": statistics.fmean(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(records: list[RequestRecord], duration_s: float, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> dict:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def good(r):
        return (slo_ttft_ms is None or r.ttft_s * 1000 <= slo_ttft_ms) and \
            (slo_tpot_ms is None or r.tpot_s is None or r.tpot_s * 1000 <= slo_tpot_ms)

    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    return {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if not r.ok})[:5],
        "duration_s": duration_s,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s else 0.0,
        "goodput": sum(good(r) for r in ok) / duration_s if duration_s and (slo_ttft_ms or slo_tpot_ms) else None,
        "ttft_ms": _stats(ms([r.ttft_s for r in ok])),
        "tpot_ms": _stats(ms([r.tpot_s for r in ok if r.tpot_s is not None])),
        "itl_ms": _stats(ms([x for r in ok for x in r.itl_s])),
        "e2el_ms": _stats(ms([r.e2e_s for r in ok])),
        "longest_prompt_ttft_ms": max(((r.prompt_tokens, r.ttft_s * 1000) for r in ok), default=(0, None))[1],
    }


def format_summary(title: str, s: dict) -> str:
    lines = [f"== {title} ==",
             f"requests: {s['completed']} completed, {s['failed']} failed, in {s['duration_s']:.2f} s",
             f"request throughput: {s['request_throughput']:.2f} req/s; output throughput: "
             f"{s['output_throughput']:.1f} tok/s ({s['output_tokens']} tokens; prompts {s['prompt_tokens']} tokens)"]
    if s["goodput"] is not None:
        lines.append(f"goodput: {s['goodput']:.2f} req/s within the SLOs")
    lines.append(f"{'metric':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        row = s[key]
        lines.append(f"{name:<10}" + "".join(f"{row[p]:>10.1f}" if row[p] is not None else f"{'-':>10}"
                                             for p in ("mean", "p50", "p90", "p99")))
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def compare(sequential: dict, loaded: dict) -> dict:
    """The speed target: loaded output tokens/s >= 3x sequential, and loaded p99 TTFT below
    2 x the unloaded mean TTFT + one prefill of the longest prompt (its unloaded TTFT)."""
    ratio = loaded["output_throughput"] / sequential["output_throughput"] if sequential["output_throughput"] else None
    unloaded = sequential["ttft_ms"]["mean"]
    longest = sequential["longest_prompt_ttft_ms"]
    bound = 2 * unloaded + longest if unloaded is not None and longest is not None else None
    p99 = loaded["ttft_ms"]["p99"]
    return {"throughput_ratio": ratio, "throughput_target": 3.0, "throughput_met": ratio is not None and ratio >= 3,
            "p99_ttft_ms": p99, "ttft_bound_ms": bound, "ttft_met": None if bound is None or p99 is None else p99 < bound}


def start_server(model: str, *, max_running: int = 16, compile: bool = False, speculative: int = 0,
                 threads: int | None = None, device: str | None = None,
                 timeout_s: float = 300.0) -> tuple[subprocess.Popen, str, Path]:
    """`longcat serve --model MODEL` on a free loopback port; (process, base URL, log file) once
    /health answers. Stop it with `stop_server`."""
    import tempfile

    import httpx

    log = Path(tempfile.mkstemp(prefix="longcat-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-c", "import sys; from longcat.cli import main; sys.exit(main())", "serve",
           "--model", model, "--host", "127.0.0.1", "--port", "0", "--max-running", str(max_running)]
    if compile:
        cmd.append("--compile")
    if speculative:
        cmd += ["--speculative", str(speculative)]
    if threads:
        cmd += ["--threads", str(threads)]
    if device:
        cmd += ["--device", device]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + timeout_s
    url = None
    while time.time() < deadline and proc.poll() is None:
        if url is None:
            match = re.search(r"on (http://[\d.]+:\d+)/v1", log.read_text())
            url = match and match.group(1)
        if url:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url, log
            except httpx.TransportError:
                pass
        time.sleep(0.3)
    stop_server(proc)
    from ..errors import UserError

    why = "exited" if proc.poll() is not None else f"did not answer /health within {timeout_s:.0f} s"
    tail = log.read_text()[-2000:].strip().splitlines()
    raise UserError(f"--model {model}: the server {why}: {tail[-1] if tail else 'no output'} (full log: {log})")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_url(url: str) -> str:
    """The base URL the requests go to: without a trailing / or /v1."""
    return url.rstrip("/").removesuffix("/v1")


def served_models(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> list[str]:
    """The model ids GET URL/v1/models lists; a UserError naming the problem when there are none."""
    import httpx

    from ..errors import UserError

    url = server_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        served = [m["id"] for m in httpx.get(url + "/v1/models", headers=headers, timeout=timeout_s).json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        served, why = [], f"{type(exc).__name__}: {exc}"
    else:
        why = "it lists no model"
    if not served:
        raise UserError(f"cannot list the models at {url}/v1/models ({why}); is the server up, is it "
                        "OpenAI-compatible, and is the key right?")
    return served


def load_test(url: str, *, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.5,
              rate: float = math.inf, concurrency: int | None = None, seed: int = 0, warmup: int = 0,
              api_key: str | None = None, served_model: str | None = None, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None, compare_sequential: bool = False, log=lambda *a: None) -> dict:
    """The seeded load against the server at `url` (after `warmup` unmeasured requests): the
    settings, `load` (what `summarize` returns) and, with `compare_sequential`, the same requests
    one at a time and the speed-target comparison."""
    url = server_url(url)
    model = served_model or served_models(url, api_key)[0]
    specs = make_requests(num_prompts, input_len, output_len, range_ratio, rate, seed)
    if warmup:
        log(f"warm-up: {warmup} requests")
        warm = make_requests(warmup, input_len, output_len, range_ratio, math.inf, seed + 1)
        asyncio.run(_run_load(url, model, warm, concurrency, api_key))
    report = {"url": url, "model": model, "num_prompts": num_prompts, "rate": rate, "concurrency": concurrency,
              "input_len": input_len, "output_len": output_len, "range_ratio": range_ratio, "seed": seed,
              "warmup": warmup}
    if compare_sequential:
        log(f"sequential: {len(specs)} requests one at a time")
        sequential_specs = [RequestSpec(s.prompt, s.max_tokens, 0.0) for s in specs]
        records, duration = asyncio.run(_run_load(url, model, sequential_specs, 1, api_key))
        report["sequential"] = summarize(records, duration, slo_ttft_ms, slo_tpot_ms)
    log(f"load: {len(specs)} requests, rate {rate} req/s, concurrency {concurrency or 'unbounded'}")
    records, duration = asyncio.run(_run_load(url, model, specs, concurrency, api_key))
    report["load"] = summarize(records, duration, slo_ttft_ms, slo_tpot_ms)
    if compare_sequential:
        report["comparison"] = compare(report["sequential"], report["load"])
    return report


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    try:
        import httpx  # noqa: F401  (the load generator's client: missing, say so before a server starts)
    except ImportError:
        raise UserError("bench serve needs the httpx package (an HTTP client): pip install httpx") from None

    checks = [
        ("--num-prompts", args.num_prompts >= 1, f"must be >= 1, got {args.num_prompts}"),
        ("--input-len", args.input_len >= 1, f"must be >= 1, got {args.input_len}"),
        ("--output-len", args.output_len >= 1, f"must be >= 1, got {args.output_len}"),
        ("--range-ratio", 0 <= args.range_ratio < 1, f"must be in [0, 1), got {args.range_ratio}"),
        ("--rate", args.rate > 0, f"must be > 0 requests/s (inf: all at once), got {args.rate}"),
        ("--concurrency", args.concurrency is None or args.concurrency >= 1, f"must be >= 1, got {args.concurrency}"),
        ("--url/--model", (args.url is None) != (args.model is None), "give exactly one: a server URL or a model "
                                                                      "directory to serve for the run"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            raise UserError(f"{flag} {rule}")
    proc = None
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.model is not None:
        log(f"starting longcat serve --model {args.model} ...")
        proc, url, _ = start_server(args.model, max_running=args.max_running, compile=args.compile,
                                    speculative=args.speculative, threads=args.threads)
    else:
        url = args.url
    try:
        report = load_test(url, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                           range_ratio=args.range_ratio, rate=args.rate, concurrency=args.concurrency, seed=args.seed,
                           warmup=args.warmup, api_key=args.api_key, served_model=args.served_model,
                           slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                           compare_sequential=args.compare_sequential, log=log)
    finally:
        if proc is not None:
            stop_server(proc)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "sequential" in report:
        print(format_summary("one at a time", report["sequential"]))
    print(format_summary(f"load (concurrency {args.concurrency or 'unbounded'}, rate {args.rate} req/s)",
                         report["load"]))
    if "comparison" in report:
        c = report["comparison"]
        print("== speed target ==")
        ratio = f"{c['throughput_ratio']:.2f}x" if c["throughput_ratio"] is not None else "-"
        print(f"output throughput, load / one at a time: {ratio} (target >= 3x: "
              f"{'met' if c['throughput_met'] else 'NOT met'})")
        if c["ttft_bound_ms"] is not None and c["p99_ttft_ms"] is not None:
            print(f"p99 TTFT under load: {c['p99_ttft_ms']:.1f} ms; bound 2 x unloaded TTFT + longest prefill: "
                  f"{c['ttft_bound_ms']:.1f} ms ({'met' if c['ttft_met'] else 'NOT met'})")
    return 0


def register(bench: argparse._SubParsersAction) -> None:
    """Add `bench serve` to the `longcat bench` subcommands."""
    p = bench.add_parser(
        "serve", help="load-test an OpenAI-compatible server: TTFT, TPOT, ITL, latency, throughput, goodput",
        description="Send seeded streaming /v1/completions requests to a server (--url, ours or another's) or to "
                    "`longcat serve` started for the run (--model), arriving as a Poisson process (--rate) or from "
                    "a fixed number of clients (--concurrency), and report TTFT, TPOT, ITL and end-to-end latency "
                    "(mean, p50, p90, p99), request and output-token throughput, and goodput under the SLOs. "
                    "Requests ask for temperature 0 and ignore_eos, so every request produces its output length.",
    )
    p.add_argument("--url", default=None, help="base URL of the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, metavar="DIR", help="start `longcat serve --model DIR` for the run instead")
    p.add_argument("--served-model", default=None, metavar="NAME",
                   help="model id to request (default: the first one GET /v1/models lists)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-prompts", type=int, default=64, help="requests in the measured run (default 64)")
    p.add_argument("--input-len", type=int, default=64, help="prompt length in words, on average (default 64)")
    p.add_argument("--output-len", type=int, default=64, help="tokens to generate per request, on average (default 64)")
    p.add_argument("--range-ratio", type=float, default=0.5,
                   help="lengths are uniform in [len x (1 - r), len x (1 + r)] (default 0.5)")
    p.add_argument("--rate", type=float, default=math.inf,
                   help="Poisson arrival rate in requests/s (default inf: all at once, limited by --concurrency)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrivals")
    p.add_argument("--warmup", type=int, default=4,
                   help="requests sent before the measured run (compilation, caches; default 4)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT objective for goodput")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT objective for goodput")
    p.add_argument("--compare-sequential", action="store_true",
                   help="first send the same requests one at a time; print the throughput ratio and the TTFT bound")
    p.add_argument("--max-running", type=int, default=16, help="with --model: the server's --max-running")
    p.add_argument("--compile", action="store_true", help="with --model: the server's --compile")
    p.add_argument("--speculative", type=int, default=0, help="with --model: the server's --speculative")
    p.add_argument("--threads", type=int, default=None, help="with --model: the server's --threads")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


__all__ = ["register", "make_requests", "summarize", "compare", "load_test", "start_server", "stop_server",
           "RequestRecord", "RequestSpec"]
