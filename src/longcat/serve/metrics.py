"""Prometheus metrics of the server, in a registry of its own (one per server, none global)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..infer.scheduler import CANCELLED, RequestOutput, Scheduler
from ..telemetry import Telemetry

# seconds: from a few ms (a compiled step of a small model) to minutes (a long prompt in a queue)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# telemetry field -> (Prometheus name, help); NaN where this machine has no such counter
TELEMETRY_GAUGES = (
    ("rss_bytes", "longcat_process_resident_memory_bytes", "Resident memory of the server process"),
    ("cpu_percent", "longcat_process_cpu_percent", "CPU use of the server process (100 = one core)"),
    ("device_memory_bytes", "longcat_device_memory_bytes", "Memory allocated on the accelerator"),
    ("power_w", "longcat_device_power_watts", "Accelerator power draw (NVML / npu-smi)"),
)


class _PrefillCounters:
    """Prompt tokens the prefill computed, and those a choice of an `n` > 1 request got as a copy of
    its prompt's cache row instead (vLLM reports prefix-cache hits alike); read from the scheduler
    at scrape time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        stats = self.scheduler.stats()
        yield CounterMetricFamily("longcat_prompt_tokens_computed", "Prompt tokens run through a prefill forward",
                                  value=stats.prompt_tokens_computed)
        yield CounterMetricFamily("longcat_prompt_tokens_copied",
                                  "Prompt tokens a choice of an n > 1 request got as a copy of the prompt's "
                                  "prefilled cache row instead of computing them", value=stats.prompt_tokens_copied)


class ServerMetrics:
    """TTFT, inter-token and end-to-end latency histograms; running/waiting/cache gauges (read from
    the scheduler at scrape time); prompt and generation token counters; the process's and the
    device's telemetry (RSS, CPU, device memory, power and energy where a counter exists)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler: Scheduler, telemetry: Telemetry | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.telemetry = telemetry
        if telemetry is not None:
            for key, name, text in TELEMETRY_GAUGES:
                Gauge(name, text, registry=r).set_function(
                    lambda key=key: telemetry.latest().get(key, float("nan")))
        self.ttft = Histogram("longcat_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("longcat_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("longcat_e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("longcat_prompt_tokens", "Prompt tokens of requests that started", registry=r)
        self.generation_tokens = Counter("longcat_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("longcat_requests_finished", "Requests finished, by reason", ["finish_reason"],
                                registry=r)
        Gauge("longcat_requests_running", "Sequences decoding (or prefilling) now", registry=r).set_function(
            lambda: (lambda s: s.running + s.prefilling)(scheduler.stats()))
        Gauge("longcat_requests_waiting", "Requests queued for a row", registry=r).set_function(
            lambda: scheduler.stats().waiting)
        Gauge("longcat_cache_usage_ratio", "Reserved share of the cache-token cap", registry=r).set_function(
            lambda: scheduler.stats().cache_usage)
        Gauge("longcat_cache_tokens_used", "Tokens held in the cache by running sequences", registry=r).set_function(
            lambda: scheduler.stats().cached_tokens)
        r.register(_PrefillCounters(scheduler))
        self._last: dict[int, float] = {}  # request id -> time of its latest output

    def observe(self, out: RequestOutput) -> None:
        """Called on the engine thread for every output."""
        request, now = out.request, time.perf_counter()
        last = self._last.get(request.id)
        if out.token_ids:
            if last is None:
                self.ttft.observe(now - request.t_arrival)
                self.prompt_tokens.inc(len(request.prompt_token_ids))
            else:
                per_token = (now - last) / len(out.token_ids)  # a speculative step brings several
                for _ in out.token_ids:
                    self.itl.observe(per_token)
            self.generation_tokens.inc(len(out.token_ids))
            self._last[request.id] = now
        if out.finished:
            self._last.pop(request.id, None)
            if out.result is not None:
                self.e2e.observe(now - request.t_arrival)
            reason = out.result.finish_reason if out.result is not None else (
                "cancelled" if out.error == CANCELLED else "error")
            self.finished.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
