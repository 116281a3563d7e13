"""Continuous batching: a step-level scheduler over the engine's decode batch.

`Engine.generate` runs one fixed batch from prefill to its last token. A server cannot wait for
that: requests arrive while others decode. The scheduler keeps one long-lived decode batch and, at
every step,

1. takes in new requests (a bounded FCFS queue) and drops cancelled ones (their rows leave the
   batch at once, the last live rows moving into their slots, as finished rows do);
2. prefills waiting prompts within a token budget per step (`prefill_chunk`): the queue's head
   requests that fit (free rows, cache tokens) form a group, prefilled together (right-padded, as
   `Engine.generate` prefills) into a staging cache over several steps, one chunk of positions per
   step, so the running streams keep decoding in between and a long prompt does not stall them.
   When a prompt is complete its latents are copied into a free row of the batch's cache (a few KB
   per token: cheap next to the forward), its first token is sampled, and it joins the batch;
3. runs one decode step of every running sequence (the engine's own step: eager or compiled,
   plain or MTP speculative, `engine._Generation._step`), retires the finished ones and reports
   their tokens.

Parallel sampling (OpenAI's `n`, `submit_choices`). The choices of one prompt form a family: one
queue entry, admitted together (rows and reserved cache tokens for every choice), prefilled once.
When the prompt is complete each choice samples its first token from the same prompt logits with
its own generator, and gets its own copy of the prompt's cache row (every main-model sublayer and
the sparse-attention index keys; the MTP sublayers are recomputed by each row's first draft, from
the prompt's hidden states, copied too), its own token row, position, penalty counts and sampler.
The copies are real: n choices hold n x prompt tokens of cache, as n requests would. A family
larger than the caps allow at once (`max_running` rows, `max_cache_tokens`) is split into
families that do fit, each prefilled once.

Slots. The batch's latent cache has `row_bucket(max_running)` rows of `max_model_len` positions
(plus the speculative window); a running sequence owns one row, packed at the front (the decode
step runs over rows 0..B-1). Admission is capped by running sequences and by reserved cache tokens
(prompt + max_tokens of every admitted sequence, `max_cache_tokens`). `stats()` reports both, and
the prompt tokens prefilled and those copied to the other choices of a family.

Threading: `submit`, `submit_choices` and `cancel` may be called from any thread; `step` (or `run`) from one thread
only, which owns the model. Results go to each request's `on_event` callback, on that thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..model import LatentCache
from .batch import DecodeBatch, token_history
from .engine import Engine, GenerationResult, TokenLogprob, _Generation, _Sequence
from .sampling import BatchSampler, GenerationError, SamplingParams, top_logprobs
from .speculative import MTPDrafter


CANCELLED = "cancelled"  # the error of a cancelled request's last output


class QueueFull(GenerationError):
    """The waiting queue is at its cap (`max_queue`); the client should retry later."""


@dataclass
class SchedulerConfig:
    """Caps of a continuous batch.

    max_running: sequences decoding together (rows of the cache).
    max_queue: requests waiting for a row; submit refuses more (QueueFull).
    max_cache_tokens: cache tokens the running sequences may reserve together (prompt + max_tokens
        each); default: every row's full context.
    prefill_chunk: prompt tokens prefilled per step at most while sequences are decoding (default:
        the engine's prefill_chunk); smaller keeps the running streams' inter-token latency low while
        a long prompt arrives. With nothing decoding, each prompt of a group gets that many positions
        per step.
    """

    max_running: int = 16
    max_queue: int = 256
    max_cache_tokens: int | None = None
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("max_running", self.max_running), ("max_queue", self.max_queue)):
            if value < 1:
                raise GenerationError(f"{name} must be >= 1, got {value}")
        if self.max_cache_tokens is not None and self.max_cache_tokens < 2:
            raise GenerationError(f"max_cache_tokens must be >= 2, got {self.max_cache_tokens}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclass
class RequestOutput:
    """What a request got in one step (delivered to its on_event callback)."""

    request: "Request"
    token_ids: list[int]  # tokens new in this output
    text: str  # text new in this output ("" without a tokenizer)
    logprobs: list[TokenLogprob] | None  # for the new tokens, when asked for
    result: GenerationResult | None = None  # set when the request finished
    error: str | None = None  # set when the request failed (the engine stopped)

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(eq=False)
class Request:
    """A submitted prompt: its sequence state and where its outputs go."""

    id: int
    seq: _Sequence
    on_event: Callable[[RequestOutput], None]
    t_arrival: float
    cancelled: bool = False
    done: bool = False
    # the other choices of the same prompt (`submit_choices`), started from this request's prefill;
    # only a family's first request is queued or prefilled
    forks: list["Request"] = field(default_factory=list)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seq.prompt

    @property
    def reserved_tokens(self) -> int:
        return len(self.seq.prompt) + self.seq.params.max_new_tokens

    @property
    def family(self) -> list["Request"]:
        """This request and its forks: the choices that share its prefill."""
        return [self, *self.forks]

    def live(self) -> list["Request"]:
        """The family's choices not cancelled: the rows and cache tokens it still needs."""
        return [r for r in self.family if not r.cancelled]


@dataclass
class _Stats:
    running: int = 0
    waiting: int = 0
    prefilling: int = 0
    rows: int = 0
    reserved_tokens: int = 0
    max_cache_tokens: int = 0
    cached_tokens: int = 0
    capacity_tokens: int = 0
    steps: int = 0
    prompt_tokens_computed: int = 0  # prompt positions run through a prefill forward (padding not counted)
    prompt_tokens_copied: int = 0  # prompt positions a choice got as a copy of its family's prefill

    @property
    def cache_usage(self) -> float:
        """Reserved share of the cache-token cap (what admission is limited by)."""
        return self.reserved_tokens / self.max_cache_tokens if self.max_cache_tokens else 0.0


class _ContinuousBatch(_Generation):
    """The engine's decode batch (`_Generation`), grown row by row as sequences are admitted."""

    def __init__(self, engine: Engine, k: int, rows: int, max_len: int) -> None:
        super().__init__(engine, [], k)
        device = engine.device
        self.full_cache = LatentCache(engine.config, rows, max_len, dtype=engine.dtype, device=device,
                                      with_mtp=bool(self.model.mtp))
        self.full_tokens = torch.zeros(rows, max_len, dtype=torch.long, device=device)
        self.full_n = torch.zeros(rows, dtype=torch.long, device=device)
        self.batch = DecodeBatch(self.full_cache.narrow(1), self.full_tokens[:1], self.full_n[:1])
        self.sampler: BatchSampler | None = None
        self.drafter = None
        if k:
            self.drafter = MTPDrafter(self.model, engine.runner, k, rows, max_len, engine.prefill_chunk,
                                      engine.draft_vocab)
            self.full_hidden, self.full_frontier = self.drafter.hidden, self.drafter.frontier
        self.rows: list[_Sequence] = []

    def admit(self, seq: _Sequence, stage: LatentCache, stage_row: int, hidden: torch.Tensor | None,
              sampler: BatchSampler) -> None:
        """Seq (prefilled into row `stage_row` of `stage`, its first token committed) joins as the
        batch's last row. hidden: the main model's pre-norm hidden states of its prompt (L, H)."""
        row, L = len(self.rows), len(seq.prompt)
        # (sublayers, 1, L, d) latents of the prompt -> the row's slot; the MTP sublayers are
        # recomputed by the first draft (its frontier starts at 0)
        for mine, theirs in ((self.full_cache.c_kv, stage.c_kv), (self.full_cache.k_rope, stage.k_rope),
                             (self.full_cache.index_k, stage.index_k)):
            if mine is not None:
                mine[:, row, :L] = theirs[:, stage_row, :L]
        self.full_tokens[row, :L] = torch.tensor(seq.prompt, device=self.full_tokens.device)
        self.full_tokens[row, L] = seq.token_ids[0]
        self.full_n[row] = L
        size = row + 1
        self.batch.cache = self.full_cache.narrow(size)
        self.batch.tokens, self.batch.n = self.full_tokens[:size], self.full_n[:size]
        if self.drafter is not None:
            self.full_hidden[0, row, :L] = hidden[:L]
            self.full_frontier[:, row] = 0
            self.drafter.steady = False  # the next step drafts over the new row's prompt
            self.drafter.hidden, self.drafter.frontier = self.full_hidden[:, :size], self.full_frontier[:, :size]
        if row == 0:  # a fresh batch: the old sampler's rows are all gone
            self.sampler = sampler
        else:
            self.sampler.extend(sampler)
        self.batch.extra = [self.sampler] + ([self.drafter] if self.drafter is not None else [])
        self.rows.append(seq)

    def retire(self, alive: list[bool]) -> None:
        """Drop the rows that are not alive (cancelled), as `_finish_step` drops finished ones."""
        if all(alive):
            return
        src, dst = self.batch.keep(alive)
        for s, d in zip(src, dst):
            self.rows[d] = self.rows[s]
        self.rows = self.rows[: sum(alive)]


class Scheduler:
    """Continuous batching over an `Engine` (its model, tokenizer, decode step and speculative
    setting). Not thread-safe except `submit`, `cancel`, `stats` and `stop`."""

    def __init__(self, engine: Engine, config: SchedulerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.k = engine.speculative
        self.max_model_len = engine.max_seq_len
        self.chunk = self.config.prefill_chunk or engine.prefill_chunk
        rows = engine.runner.cache_rows(self.config.max_running)
        self.max_len = self.max_model_len + self.k + 1  # a verify reaches k positions past the last token
        self.max_cache_tokens = self.config.max_cache_tokens or self.config.max_running * self.max_model_len
        self._batch = _ContinuousBatch(engine, self.k, rows, self.max_len)
        model = engine.model
        # the staging cache of a prefill group: a group has at most max_running prompts
        group = self.config.max_running
        self._stage = LatentCache(engine.config, group, self.max_len, dtype=engine.dtype, device=engine.device,
                                  with_mtp=bool(model.mtp))
        self._stage_tokens = torch.zeros(group, self.max_len, dtype=torch.long, device=engine.device)
        self._stage_hidden = None
        if self.k:
            self._stage_hidden = torch.zeros(group, self.max_len, engine.config.hidden_size, dtype=engine.dtype,
                                             device=engine.device)
        self._history = engine.config.oe_neighbor_num - 1 if engine.config.ngram_enabled else 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[Request] = deque()
        self._waiting: deque[Request] = deque()
        self._group: list[Request | None] = []  # the prefill group by staging row (None: started or dropped)
        self._group_pos = 0  # prompt positions of the group prefilled so far
        self._ids = itertools.count()
        self._stopped = False
        self.error: BaseException | None = None  # set when a step failed; the scheduler is then dead
        self.steps = 0
        self.prompt_tokens_computed = 0
        self.prompt_tokens_copied = 0
        engine.runner.prepare()
        engine._busy = True  # the scheduler owns the engine's model and step from now on

    # --- any thread ------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], params: SamplingParams,
               on_event: Callable[[RequestOutput], None]) -> Request:
        """Queue a prompt; raises GenerationError (bad prompt or parameters, prompt too long) or
        QueueFull before anything runs."""
        return self.submit_choices(prompt, [params], [on_event])[0]

    def submit_choices(self, prompt: str | Sequence[int], params: Sequence[SamplingParams],
                       on_events: Sequence[Callable[[RequestOutput], None]]) -> list[Request]:
        """Queue len(params) choices of one prompt (OpenAI's `n`; choice i samples with params[i] and
        reports to on_events[i]): the prompt is prefilled once, and every choice continues from a copy
        of its cache row. Each choice is a Request of its own (cancel, outputs, result). All or none
        are queued: raises GenerationError or QueueFull (the queue cannot take every choice) before
        anything runs."""
        if self.error is not None or self._stopped:
            raise GenerationError("the engine has stopped; no new requests are accepted")
        if not params or len(params) != len(on_events):
            raise GenerationError(f"give one on_event per choice: got {len(params)} SamplingParams and "
                                  f"{len(on_events)} callbacks")
        now = time.perf_counter()
        seqs = self.engine._sequences([prompt] * len(params), list(params), False, True, now)
        requests = []
        for seq, on_event in zip(seqs, on_events):
            request = Request(next(self._ids), seq, on_event, now)
            seq.request = request  # the step's events name sequences; their outputs go to the request
            requests.append(request)
        families = self._families(requests)
        with self._lock:
            queued = self._queued_choices()
            if queued + len(requests) > self.config.max_queue:
                raise QueueFull(f"the queue holds {queued} of at most {self.config.max_queue} waiting requests "
                                f"(max_queue) and this one brings {len(requests)}; retry later")
            self._incoming.extend(families)
            self._wake.notify()
        return requests

    def _families(self, choices: list[Request]) -> list[Request]:
        """Choices of one prompt -> family heads (forks attached), each family small enough to be
        admitted alone: at most max_running rows and, beyond one choice, max_cache_tokens."""
        heads: list[Request] = []
        for request in choices:
            head = heads[-1] if heads else None
            if head is not None and len(head.family) < self.config.max_running and \
                    sum(r.reserved_tokens for r in head.family) + request.reserved_tokens <= self.max_cache_tokens:
                head.forks.append(request)
            else:
                heads.append(request)
        return heads

    def _queued_choices(self) -> int:
        """Choices waiting for a row (callers hold the lock)."""
        return sum(len(r.live()) for queue in (self._incoming, self._waiting) for r in queue)

    def cancel(self, request: Request) -> None:
        """Stop a request; its row (or queue place) is freed at the next step."""
        request.cancelled = True
        with self._lock:
            self._wake.notify()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()

    def stats(self) -> _Stats:
        running = list(self._batch.rows)
        prefilling = [c for r in list(self._group) if r is not None for c in r.live()]
        reserved = sum(len(s.prompt) + s.params.max_new_tokens for s in running)
        reserved += sum(r.reserved_tokens for r in prefilling)
        # every choice's row holds its own copy of the prompt: n choices count n prompts
        cached = sum(len(s.prompt) + len(s.token_ids) for s in running)
        with self._lock:
            waiting = self._queued_choices()
        return _Stats(
            running=len(running), waiting=waiting, prefilling=len(prefilling),
            rows=self._batch.full_tokens.shape[0], reserved_tokens=reserved, max_cache_tokens=self.max_cache_tokens,
            cached_tokens=cached, capacity_tokens=self._batch.full_tokens.shape[0] * self.max_len, steps=self.steps,
            prompt_tokens_computed=self.prompt_tokens_computed, prompt_tokens_copied=self.prompt_tokens_copied,
        )

    @property
    def alive(self) -> bool:
        return self.error is None

    # --- the engine thread -----------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._batch.rows or self._waiting or self._incoming or any(self._group))

    def run(self, idle_wait_s: float = 0.05) -> None:
        """Step until stop(); a failing step fails every request and ends the loop (`error`)."""
        while True:
            with self._lock:
                while not self._stopped and not self.has_work():
                    self._wake.wait(idle_wait_s)
                if self._stopped:
                    break
            try:
                self.step()
            except BaseException as exc:  # noqa: BLE001 - a dead engine must fail its requests, not hang them
                self._fail_all(exc)
                return
        self._fail_all(GenerationError("the server is shutting down"))

    def step(self) -> bool:
        """One scheduling step; returns whether it did any work."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        worked = False
        with torch.inference_mode():
            self._drop_cancelled()
            if not any(self._group):
                self._form_group()
            if any(self._group):
                self._prefill_chunk()
                worked = True
        if self._batch.rows:
            with torch.inference_mode():
                events, now = self._batch._step()
            self._emit(events, now)
            worked = True
        if worked:
            self.steps += 1
        return worked

    # --- internals -------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        # a family leaves the queue (or stops prefilling) once every choice is cancelled; a cancelled
        # choice of a family that goes on is finished now and skipped when the family starts
        for head in [r for r in self._waiting if any(c.cancelled for c in r.family)]:
            for choice in head.family:
                if choice.cancelled:
                    self._finish_cancelled(choice)
            if not head.live():
                self._waiting.remove(head)
        for i, head in enumerate(self._group):
            if head is not None and any(c.cancelled for c in head.family):
                for choice in head.family:
                    if choice.cancelled:
                        self._finish_cancelled(choice)
                if not head.live():
                    self._group[i] = None
        rows = self._batch.rows
        if any(s.request.cancelled for s in rows):
            cancelled = [s.request for s in rows if s.request.cancelled]
            self._batch.retire([not s.request.cancelled for s in rows])
            for request in cancelled:
                self._finish_cancelled(request)

    def _finish_cancelled(self, request: Request) -> None:
        if not request.done:
            request.done = True
            request.on_event(RequestOutput(request, [], "", None, error=CANCELLED))

    def _form_group(self) -> None:
        """The queue's head requests that get a row and their cache tokens (FCFS: nothing jumps the
        head) become the next prefill group, their prompts written right-padded into staging rows."""
        rows = len(self._batch.rows)
        reserved = sum(len(s.prompt) + s.params.max_new_tokens for s in self._batch.rows)
        group = []
        while self._waiting:
            head = self._waiting[0]
            choices = head.live()  # a family is admitted whole: a row and its tokens for every choice
            if rows + len(choices) > self.config.max_running:
                break
            need = sum(c.reserved_tokens for c in choices)
            # a lone family may always run: its length was checked against the context, and
            # `_families` sized it to the caps
            if (rows or group) and reserved + need > self.max_cache_tokens:
                break
            group.append(self._waiting.popleft())
            rows += len(choices)
            reserved += need
        for i, request in enumerate(group):
            prompt = request.seq.prompt
            self._stage_tokens[i, : len(prompt)] = torch.tensor(prompt, device=self.engine.device)
        self._group, self._group_pos = group, 0

    def _prefill_chunk(self) -> None:
        """One chunk of positions of the prefill group (about `prefill_chunk` tokens in all): the
        prompts that end in it get their first token and join the batch."""
        engine, model = self.engine, self.engine.model
        G, s = len(self._group), self._group_pos
        longest = max(len(r.seq.prompt) for r in self._group if r is not None)
        # the budget bounds how long running streams wait for this step; with none running, a
        # burst of prompts is prefilled in as few forwards as the chunk allows
        per_row = max(1, self.chunk // G) if self._batch.rows else self.chunk
        e = min(longest, s + per_row)
        ids = self._stage_tokens[:G, s:e]
        positions = torch.arange(s, e, device=engine.device).expand(G, -1)
        history = None
        if self._history:
            history = token_history(self._stage_tokens[:G], torch.full((G,), s, device=engine.device), self._history)
        out = model(ids, positions=positions, cache=self._stage.narrow(G), ngram_history=history, mtp=False,
                    indexer_loss=False, logits_to_keep=1)
        if self._stage_hidden is not None:
            self._stage_hidden[:G, s:e] = out.pre_norm_hidden
        self._group_pos = e
        self.prompt_tokens_computed += sum(max(0, min(e, len(r.seq.prompt)) - s) for r in self._group if r is not None)
        for row, request in enumerate(self._group):
            if request is None or not s < len(request.seq.prompt) <= e:
                continue
            last = out.hidden_states[row, len(request.seq.prompt) - 1 - s]  # (H,) normed, the prompt's end
            logits = model.lm_head(last).view(1, 1, -1)
            started = 0
            for choice in request.family:  # every choice forks from this one prefill
                if choice.cancelled:  # (cancelled since this step began: never started, so finish it here)
                    self._finish_cancelled(choice)
                    continue
                self._start(choice, logits, row)
                # the first choice started uses the prefill; each further one holds a copy of it
                self.prompt_tokens_copied += len(choice.seq.prompt) if started else 0
                started += 1
            self._group[row] = None  # after the starts: a failure there still reaches these requests
        if not any(self._group):
            self._group = []

    def _start(self, request: Request, logits: torch.Tensor, stage_row: int) -> None:
        """The first token of a prefilled request (as `_Generation._commit_first`), drawn with its own
        sampler from its family's prompt logits (1, 1, V); it joins the batch with a copy of staging
        row `stage_row`."""
        seq = request.seq
        sampler = BatchSampler([seq.params], [seq.prompt], self.engine.config.vocab_size, self.engine.device)
        tokens, _ = sampler.choose(sampler.process(logits))  # (1, 1)
        logprobs = None
        if seq.logprobs is not None:
            chosen, values, top_ids = top_logprobs(logits, tokens, seq.params.logprobs)
            n = seq.params.logprobs
            logprobs = [TokenLogprob(int(tokens[0, 0]), float(chosen[0, 0]),
                                     list(zip(top_ids[0, 0].tolist()[:n], values[0, 0].tolist()[:n])))]
        now = time.perf_counter()
        new, delta = seq.add(tokens[0].tolist(), logprobs, now)
        sampler.record([new])
        if seq.finish_reason is None:
            hidden = self._stage_hidden[stage_row] if self._stage_hidden is not None else None
            self._batch.admit(seq, self._stage, stage_row, hidden, sampler)
        self._emit([(seq, new, delta)], now)

    def _emit(self, events, now: float) -> None:
        for seq, new, delta in events:
            request: Request = seq.request
            if request.done:
                continue
            result = seq.result(now, self.k) if seq.finish_reason is not None else None
            logprobs = seq.logprobs[len(seq.logprobs) - len(new):] if seq.logprobs is not None else None
            if result is not None:
                request.done = True
            request.on_event(RequestOutput(request, list(new), delta, logprobs, result))

    def _fail_all(self, exc: BaseException) -> None:
        if not self._stopped:
            self.error = exc
        with self._lock:
            pending = [c for r in list(self._incoming) + list(self._waiting) for c in r.family]
            self._incoming.clear()
            self._waiting.clear()
        pending += [c for r in self._group if r is not None for c in r.family]
        self._group = []
        pending += [s.request for s in self._batch.rows]
        self._batch.rows = []
        message = f"{type(exc).__name__}: {exc}"
        for request in pending:
            if not request.done:
                request.done = True
                request.on_event(RequestOutput(request, [], "", None, error=message))


__all__ = ["Scheduler", "SchedulerConfig", "Request", "RequestOutput", "QueueFull", "CANCELLED"]
