"""Batched generation over the latent MLA cache, with optional MTP speculative decoding.

    engine = Engine(model, tokenizer)
    results = engine.generate(["Once upon a time", "The cat"], SamplingParams(max_new_tokens=64))
    for event in engine.stream("Hello", SamplingParams(temperature=0)):  # tokens as they come
        print(event.text, end="")

One `generate` call runs its prompts as one batch:

- prefill: every prompt goes through the model in chunks of `prefill_chunk` positions (rows
  right-padded to the longest prompt), writing `[c_kv, k_rope]` per token per attention sublayer
  into a preallocated `LatentCache` that the engine keeps between calls;
- decode: every step feeds each row's newest token at that row's own position, so prompts of
  different lengths decode together, through the model's own decode forward
  (`LongCatForCausalLM.decode`, eagerly or torch.compile'd: step.py): attention in the absorbed
  form directly over the cached latents, only the chosen experts, LongCat sparse attention over
  the cached indexer keys, the n-gram embedding reading each row's last n-1 tokens;
- speculative decoding (`speculative=k`): the MTP heads draft k tokens (from the first
  `draft_vocab` token ids), one main-model forward verifies them (speculative.py);
- finished rows leave the batch at once (the last live rows move into their slots).

Nothing is allocated per step except the small tensors the model itself creates; prompts that do
not fit the configured context (`max_seq_len`) are refused before any compute, or truncated from
the left when asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model import LatentCache, LongCatForCausalLM
from .batch import DecodeBatch, token_history
from .step import DecodeStep
from .sampling import BatchSampler, GenerationError, SamplingParams, top_logprobs
from .speculative import MTPDrafter, check_draft_vocab, default_draft_vocab, greedy_accept, rejection_accept

Prompt = str | Sequence[int]


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the likeliest alternatives (token id, logprob), best first


@dataclass
class GenerationResult:
    index: int  # position of the prompt in the request
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only (including the stop token that ended them)
    text: str | None  # the generated text (tokenizer present), without the stop token or string
    finish_reason: str  # "stop" (end-of-text, a stop token or a stop string) or "length"
    stop_reason: int | str | None  # the stop token id or stop string, when finish_reason is "stop"
    logprobs: list[TokenLogprob] | None
    ttft_s: float  # request start to first token (prefill included)
    total_s: float  # request start to last token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    speculative: int = 0  # drafts per step (0 = plain decoding)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first one over the time after the first one."""
        n, span = len(self.token_ids), self.total_s - self.ttft_s
        if n > 1 and span > 0:
            return (n - 1) / span
        return n / self.total_s if self.total_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts over proposed drafts; None without speculative decoding."""
        if not self.speculative:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def to_dict(self) -> dict:
        out = {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": len(self.prompt_token_ids),
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "tokens_per_s": self.tokens_per_s,
            "acceptance_rate": self.acceptance_rate,
            "speculative": self.speculative,
        }
        if self.logprobs is not None:
            out["logprobs"] = [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]} for lp in self.logprobs
            ]
        return out


@dataclass
class StreamEvent:
    index: int  # which prompt
    token_ids: list[int]  # tokens new in this event
    text: str  # text new in this event ("" without a tokenizer)
    result: GenerationResult | None = None  # set on the event that finishes the prompt

    @property
    def finished(self) -> bool:
        return self.result is not None


class _Text:
    """Incremental detokenization with stop strings.

    Text that could still turn out to be the start of a stop string, or a partial UTF-8 character,
    is held back until the next tokens decide it.
    """

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def update(self, ids: list[int], final: bool) -> tuple[str, str | None]:
        """All text ids so far -> (text new since the last call, the stop string found or None)."""
        text = self.tokenizer.decode(ids)
        hit = None
        if self.stops:
            begin = max(0, len(self.text) - self.hold)
            found = [(i, s) for s in self.stops if (i := text.find(s, begin)) >= 0]
            if found:
                cut, hit = min(found)
                text, final = text[:cut], True
        self.text = text
        end = len(text)
        if not final:
            end -= self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, self.sent)
        delta, self.sent = text[self.sent : end], end
        return delta, hit


@dataclass
class _Sequence:
    """Host-side state of one prompt."""

    index: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    text: _Text | None
    stream_text: bool
    t_start: float
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    t_first: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    drafted: int = 0
    accepted: int = 0

    def add(self, tokens: list[int], logprobs: list[TokenLogprob] | None, now: float) -> tuple[list[int], str]:
        """Commit tokens in order until a stop condition; returns (tokens taken, new text)."""
        if not self.token_ids:
            self.t_first = now
        start = len(self.token_ids)
        # with stop strings the text is checked after every token, so nothing past one is kept
        per_token = self.text is not None and bool(self.params.stop)
        delta = ""
        for j, t in enumerate(tokens):
            self.token_ids.append(t)
            if logprobs is not None:
                self.logprobs.append(logprobs[j])
            if t in self.stop_ids:
                self.finish_reason, self.stop_reason = "stop", t
            elif len(self.token_ids) >= self.params.max_new_tokens:
                self.finish_reason = "length"
            if per_token:
                piece, hit = self.text.update(self._text_ids(), final=self.finish_reason is not None)
                delta += piece
                if hit is not None:
                    self.finish_reason, self.stop_reason = "stop", hit
            if self.finish_reason is not None:
                break
        if self.text is not None and self.stream_text and not per_token:
            delta, _ = self.text.update(self._text_ids(), final=self.finish_reason is not None)
        return self.token_ids[start:], delta

    def _text_ids(self) -> list[int]:
        ended_by_token = self.finish_reason == "stop" and isinstance(self.stop_reason, int)
        return self.token_ids[:-1] if ended_by_token else self.token_ids

    def result(self, now: float, speculative: int) -> GenerationResult:
        text = None
        if self.text is not None:
            text = self.text.text if (self.stream_text or self.params.stop) else self.text.tokenizer.decode(self._text_ids())
        return GenerationResult(
            index=self.index, prompt_token_ids=self.prompt, token_ids=list(self.token_ids), text=text,
            finish_reason=self.finish_reason or "length", stop_reason=self.stop_reason, logprobs=self.logprobs,
            ttft_s=self.t_first - self.t_start, total_s=now - self.t_start, num_draft_tokens=self.drafted,
            num_accepted_tokens=self.accepted, speculative=speculative,
        )


def _is_token_ids(prompt) -> bool:
    """One prompt given as token ids (list, tuple, 1-D tensor or array), not a list of prompts."""
    if getattr(prompt, "ndim", None) == 1:
        return True
    return isinstance(prompt, Sequence) and len(prompt) > 0 and not isinstance(prompt[0], str) \
        and getattr(prompt[0], "ndim", 0) == 0 and not isinstance(prompt[0], Sequence)


class Engine:
    """Generation for a `LongCatForCausalLM` (any device, any dtype).

    tokenizer: any object with encode(str) -> ids, decode(ids) -> str and eos_id (and bos_id,
        prompt_prefix); needed for text prompts, text output and stop strings.
    max_seq_len: the context a request may use, prompt plus new tokens (default: the model's
        max_position_embeddings). The cache is allocated for what a batch needs, up to this.
    prefill_chunk: prompt positions per prefill forward (bounds the prefill's attention memory).
    speculative: MTP draft tokens per step by default (0 = plain decoding; a call can override).
    draft_vocab: the drafts come from the first draft_vocab token ids (0 = all; a call can
        override). None: min(vocab, 2048) for a tokenizer of ours, whose ids follow its BPE merges
        (frequent tokens first), all ids otherwise (`speculative.default_draft_vocab`). Output is
        unchanged (greedy: the same tokens; sampling: the same distribution); only speed and
        acceptance change.
    add_bos: None starts text prompts with the tokenizer's `prompt_prefix` (eos for our models, whose
        training documents start after one; a Hugging Face tokenizer's own bos policy; nothing
        for a tokenizer without one). True puts bos first instead, False nothing.
    compile: wrap the model's decode step in torch.compile (step.py; the same code as the eager
        step): the fastest path at small batches, after a compilation of tens of seconds per row
        bucket on first use (cached on disk by inductor).
    prefill_fn: `prefill_fn(model, prompt_ids (N,), cache) -> logits (1, V)` prefills one prompt
        into a one-row LatentCache (main-model sublayers) in place of the chunked prefill, e.g.
        context-parallel prefill over a process group
        (`functools.partial(longcat.parallel.cp_prefill.prefill_context_parallel, group=g)`); every
        rank then runs the same generations. Plain decoding only: MTP drafts need the hidden state
        of every prompt position, which it does not return.
    """

    def __init__(
        self,
        model: LongCatForCausalLM,
        tokenizer=None,
        *,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        speculative: int = 0,
        add_bos: bool | None = None,
        compile: bool = False,
        prefill_fn: Callable | None = None,
        draft_vocab: int | None = None,
    ) -> None:
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len or self.config.max_position_embeddings)
        if self.max_seq_len < 2:
            raise GenerationError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.prefill_fn = prefill_fn
        self.speculative = self._check_speculative(speculative)
        V = self.config.vocab_size
        if draft_vocab is None:
            draft_vocab = default_draft_vocab(V, tokenizer)
        self.draft_vocab = check_draft_vocab(draft_vocab, V)  # ids drafted from (V: all)
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.eos_id = getattr(tokenizer, "eos_id", None)
        if self.eos_id is None:
            self.eos_id = self.config.eos_token_id
        self.bos_id = getattr(tokenizer, "bos_id", None)
        if self.bos_id is None:
            self.bos_id = self.config.bos_token_id
        if add_bos is None:
            self.prompt_prefix = [int(t) for t in getattr(tokenizer, "prompt_prefix", [])]
        else:
            self.prompt_prefix = [self.bos_id] if add_bos else []
        self._cache: LatentCache | None = None
        self._busy = False  # one generation at a time: they share the cache
        if compile and getattr(model, "inference_ranks", None) is not None:
            from ..errors import UserError

            # the ranks' all-reduces run from forward hooks and the MoE dispatcher, eagerly
            raise UserError("Engine(compile=True) does not support a model sharded for inference on several "
                            "ranks (parallel.inference.shard_for_inference); use compile=False")
        self.runner = DecodeStep(model, compile=compile)

    # --- public API ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        speculative: int | None = None,
        truncate_prompt: bool = False,
        draft_vocab: int | None = None,
    ) -> list[GenerationResult]:
        """One result per prompt, in prompt order (a single prompt gives a one-element list)."""
        results: dict[int, GenerationResult] = {}
        for event in self.stream(prompts, params, speculative=speculative, truncate_prompt=truncate_prompt,
                                 draft_vocab=draft_vocab, _stream_text=False):
            if event.result is not None:
                results[event.index] = event.result
        return [results[i] for i in sorted(results)]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        speculative: int | None = None,
        truncate_prompt: bool = False,
        draft_vocab: int | None = None,
        _stream_text: bool = True,
    ) -> Iterator[StreamEvent]:
        """Like generate, but yields a StreamEvent whenever a prompt gets new tokens.

        Everything is checked (prompt lengths, parameters) before the first forward, so a request
        that cannot run fails before it starts, never half-way.
        """
        t_start = time.perf_counter()
        k = self.speculative if speculative is None else self._check_speculative(speculative)
        vocab = self.draft_vocab if draft_vocab is None else check_draft_vocab(draft_vocab, self.config.vocab_size)
        seqs = self._sequences(prompts, params, truncate_prompt, _stream_text, t_start)
        if self._busy:
            raise GenerationError("this Engine is already generating (its cache is in use); finish or close that "
                                  "stream first, or batch the prompts into one call")
        return _Generation(self, seqs, k, vocab).run()

    def encode(self, text: str) -> list[int]:
        """The token ids a text prompt runs as (the tokenizer's ids after `prompt_prefix`)."""
        if self.tokenizer is None:
            raise GenerationError("text prompts need a tokenizer: pass Engine(model, tokenizer) or token ids")
        ids = list(self.tokenizer.encode(text))
        if self.prompt_prefix and ids[: len(self.prompt_prefix)] != self.prompt_prefix:
            ids = self.prompt_prefix + ids
        return ids

    def release(self) -> None:
        """Free the preallocated cache (the next generation allocates again)."""
        if self._busy:
            raise GenerationError("cannot free the cache during a generation")
        self._cache = None

    # --- request checks ----------------------------------------------------------------------------
    def _check_speculative(self, k: int) -> int:
        if k < 0:
            raise GenerationError(f"speculative must be >= 0 draft tokens, got {k}")
        if k and self.prefill_fn is not None:
            raise GenerationError("speculative decoding needs the engine's own prefill (the MTP drafts read every "
                                  "prompt position's hidden state); use speculative=0 with prefill_fn")
        if k and not self.model.mtp:
            raise GenerationError(
                "speculative decoding drafts with the MTP heads, and this model has none "
                "(mtp_num_layers = 0); use speculative=0"
            )
        return k

    def _sequences(self, prompts, params, truncate: bool, stream_text: bool, t_start: float) -> list[_Sequence]:
        if isinstance(prompts, str) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if not prompts:
            raise GenerationError("no prompts given")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise GenerationError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
        V = self.config.vocab_size
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise GenerationError("text prompts need a tokenizer: pass Engine(model, tokenizer) or token ids")
                ids = self.encode(prompt)
            else:
                ids = prompt
            if not ids:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {V}): {bad[:5]}")
            if p.stop and self.tokenizer is None:
                raise GenerationError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
            room = self.max_seq_len - p.max_new_tokens
            if room < 1:
                raise GenerationError(
                    f"prompt {i} asks for {p.max_new_tokens} new tokens, but the context holds {self.max_seq_len} "
                    "(max_seq_len), prompt included: lower max_new_tokens below max_seq_len, or raise max_seq_len"
                )
            if len(ids) > room:
                if not truncate:
                    raise GenerationError(
                        f"prompt {i} has {len(ids)} tokens and asks for {p.max_new_tokens} new ones, but the "
                        f"context holds {self.max_seq_len} (max_seq_len): shorten the prompt, lower max_new_tokens, "
                        "raise max_seq_len, or allow truncation (truncate_prompt=True / --truncate-prompt keeps the "
                        "prompt's end)"
                    )
                ids = ids[len(ids) - room :]
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.add(self.eos_id)
            text = _Text(self.tokenizer, list(p.stop)) if self.tokenizer is not None else None
            logprobs = [] if p.logprobs is not None else None
            seqs.append(_Sequence(i, ids, p, frozenset(stops), text, stream_text, t_start, logprobs=logprobs))
        return seqs

    def cache_for(self, batch_size: int, max_len: int) -> LatentCache:
        """The engine's preallocated latent cache, grown (never shrunk) to fit, narrowed to the batch."""
        c = self._cache
        want = self.runner.cache_rows(batch_size)  # the compiled runner pads a batch: those rows must exist
        if c is None or c.c_kv.shape[1] < want or c.max_len < max_len or c.c_kv.dtype != self.dtype:
            rows = max(want, c.c_kv.shape[1] if c is not None else 0)
            length = max(max_len, c.max_len if c is not None else 0)
            self._cache = None  # free the old one first
            self._cache = LatentCache(self.config, rows, length, dtype=self.dtype, device=self.device,
                                      with_mtp=bool(self.model.mtp))
        return self._cache.narrow(batch_size)


class _Generation:
    """One batch of sequences from prefill to the last token."""

    def __init__(self, engine: Engine, seqs: list[_Sequence], k: int, draft_vocab: int | None = None) -> None:
        self.engine, self.model, self.seqs, self.k = engine, engine.model, seqs, k
        self.draft_vocab = draft_vocab
        self.history = self.model.config.oe_neighbor_num - 1 if self.model.config.ngram_enabled else 0

    def run(self) -> Iterator[StreamEvent]:
        engine = self.engine
        if engine._busy:
            raise GenerationError("this Engine is already generating; finish or close that stream first")
        engine._busy = True
        try:
            yield from self._run()
        finally:
            engine._busy = False

    def _run(self) -> Iterator[StreamEvent]:
        engine, seqs, k = self.engine, self.seqs, self.k
        B = len(seqs)
        lengths = [len(s.prompt) for s in seqs]
        max_len = max(len(s.prompt) + s.params.max_new_tokens for s in seqs) + k
        engine.runner.prepare()  # the compiled step checks the weights' dtype and device once here
        with torch.inference_mode():
            cache = engine.cache_for(B, max_len)
            tokens = torch.zeros(B, max_len, dtype=torch.long, device=engine.device)
            for i, s in enumerate(seqs):
                tokens[i, : len(s.prompt)] = torch.tensor(s.prompt, device=engine.device)
            n = torch.tensor(lengths, device=engine.device)
            self.batch = DecodeBatch(cache, tokens, n)
            self.sampler = BatchSampler([s.params for s in seqs], [s.prompt for s in seqs],
                                        self.model.config.vocab_size, engine.device)
            self.batch.extra.append(self.sampler)
            self.drafter = None
            if k:
                self.drafter = MTPDrafter(self.model, engine.runner, k, B, max_len, engine.prefill_chunk,
                                          self.draft_vocab)
                self.batch.extra.append(self.drafter)
            self.rows = list(seqs)  # the sequence in each batch row
            logits = self._prefill(n, max(lengths))
            first = self._commit_first(logits)
        yield from self._emit(first)
        while self.rows:
            with torch.inference_mode():
                events = self._step()
            yield from self._emit(events)

    # --- prefill -------------------------------------------------------------------------------
    def _prefill(self, lengths: torch.Tensor, longest: int) -> torch.Tensor:
        """Prompts -> cache; returns the logits (B, 1, V) after each prompt's last token."""
        if self.engine.prefill_fn is not None:
            return self._prefill_each(lengths)
        batch, model, chunk = self.batch, self.model, self.engine.prefill_chunk
        B = batch.size
        last = None
        for s in range(0, longest, chunk):
            e = min(longest, s + chunk)
            ids = batch.tokens[:, s:e]
            positions = torch.arange(s, e, device=ids.device).expand(B, -1)
            history = None
            if self.history:
                history = token_history(batch.tokens, torch.full((B,), s, device=ids.device), self.history)
            out = model(ids, positions=positions, cache=batch.cache, ngram_history=history, mtp=False,
                        indexer_loss=False, logits_to_keep=1)
            if self.drafter is not None:
                self.drafter.store_main_hidden(positions, out.pre_norm_hidden)
            col = lengths - 1 - s  # each row's last prompt position, relative to this chunk
            here = ((col >= 0) & (col < e - s)).unsqueeze(-1)
            H = out.hidden_states.shape[-1]
            normed = out.hidden_states.gather(1, col.clamp(0, e - s - 1).view(B, 1, 1).expand(B, 1, H)).squeeze(1)
            last = normed if last is None else torch.where(here, normed, last)
        return model.lm_head(last).unsqueeze(1)

    def _prefill_each(self, lengths: torch.Tensor) -> torch.Tensor:
        """The engine's `prefill_fn`, prompt by prompt, each into a one-row cache whose keys are then
        copied into the batch's row; returns the logits (B, 1, V) after each prompt's last token."""
        batch, model = self.batch, self.model
        config, main = model.config, 2 * model.config.num_layers
        rows = []
        for i in range(batch.size):
            n = int(lengths[i])
            one = LatentCache(config, 1, n, dtype=batch.cache.c_kv.dtype, device=batch.tokens.device, with_mtp=False)
            rows.append(self.engine.prefill_fn(model, batch.tokens[i, :n], one).view(1, -1))
            batch.cache.c_kv[:main, i, :n] = one.c_kv[:, 0]
            batch.cache.k_rope[:main, i, :n] = one.k_rope[:, 0]
            if one.index_k is not None:
                batch.cache.index_k[:, i, :n] = one.index_k[:, 0]
        return torch.cat(rows).unsqueeze(1)  # (B, 1, V)

    def _commit_first(self, logits: torch.Tensor):
        x = self.sampler.process(logits)
        tokens, _ = self.sampler.choose(x)  # (B, 1)
        self.batch.tokens.scatter_(1, self.batch.n.unsqueeze(1), tokens)
        return self._finish_step(tokens, [1] * len(self.rows), logits, None)

    # --- one decode step ------------------------------------------------------------------------
    def _step(self):
        batch, sampler, k = self.batch, self.sampler, self.k
        if k and self.fast_greedy:
            # each row's newest position, from the host's own count (no device read to decide)
            rows = self.drafter.greedy_step(batch, [len(s.prompt) + len(s.token_ids) - 1 for s in self.rows])
            if rows is not None:  # per row: k+1 emitted tokens, then the accepted draft count a
                return self._finish_step(None, [r[-1] + 1 for r in rows], None, [r[-1] for r in rows],
                                         ids=[r[:-1] for r in rows])
        drafts = q = None
        if k:
            drafts, q = self.drafter.draft(batch, sampler)
            positions = batch.n.unsqueeze(1) + torch.arange(k + 1, device=batch.n.device)  # (B, k+1)
        else:
            positions = batch.n.unsqueeze(1)
        ids = batch.tokens.gather(1, positions)
        history = token_history(batch.tokens, batch.n, self.history) if self.history else None
        raw, hidden = self.engine.runner.forward(ids, positions, batch.cache, history, last_only=not k)  # (B, k+1, V)
        x = sampler.process(raw, drafts)
        if not k:
            tokens, _ = sampler.choose(x)  # (B, 1)
            batch.tokens.scatter_(1, positions + 1, tokens)
            batch.n += 1
            return self._finish_step(tokens, None, raw, None)
        self.drafter.store_main_hidden(positions, hidden)
        targets = x.argmax(-1)  # (B, k+1)
        accepted = greedy_accept(targets, drafts)
        following = targets.gather(1, accepted.unsqueeze(1)).squeeze(1)
        if not sampler.all_greedy:
            s_acc, s_next = rejection_accept(x.softmax(-1), q, drafts, sampler.uniforms(k),
                                             sampler.exponential_noise(1, x.shape[-1])[:, 0])
            accepted = torch.where(sampler.greedy, accepted, s_acc)
            following = torch.where(sampler.greedy, following, s_next)
        # emitted tokens: drafts[:a] then `following`, laid out in a (B, k+1) row
        emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter_(1, accepted.unsqueeze(1), following.unsqueeze(1))
        batch.tokens.scatter_(1, (batch.n + accepted + 1).unsqueeze(1), following.unsqueeze(1))
        batch.n += accepted + 1
        counts = (accepted + 1).tolist()
        return self._finish_step(emitted, counts, raw, accepted.tolist())

    @property
    def fast_greedy(self) -> bool:
        """Whether a speculative step may skip the sampler: every row greedy, and nothing read from
        the logits but their argmax (no penalties, no logprobs)."""
        s = self.sampler
        return s.all_greedy and not s.any_penalty and s.max_logprobs is None

    def _finish_step(self, emitted: torch.Tensor | None, counts, raw: torch.Tensor | None, accepted, ids=None):
        """Host side: commit tokens to each sequence, check stops; returns (sequence, tokens, text).
        ids: emitted as lists, where the caller has them already."""
        now = time.perf_counter()
        ids = emitted.tolist() if ids is None else ids
        lp = None
        if self.sampler.max_logprobs is not None:
            chosen, values, top_ids = top_logprobs(raw, emitted, self.sampler.max_logprobs)
            lp = (chosen.tolist(), values.tolist(), top_ids.tolist())
        events, alive, committed = [], [], []
        for i, seq in enumerate(self.rows):
            count = counts[i] if counts is not None else 1
            row = ids[i][:count]
            logprobs = None
            if seq.logprobs is not None:
                n = seq.params.logprobs
                logprobs = [TokenLogprob(row[j], lp[0][i][j], list(zip(lp[2][i][j][:n], lp[1][i][j][:n])))
                            for j in range(count)]
            if accepted is not None:
                seq.drafted += self.k
                seq.accepted += accepted[i]
            new, delta = seq.add(row, logprobs, now)
            committed.append(new)
            events.append((seq, new, delta))
            alive.append(seq.finish_reason is None)
        self.sampler.record(committed)
        if not all(alive):
            src, dst = self.batch.keep(alive)
            for s, d in zip(src, dst):
                self.rows[d] = self.rows[s]
            self.rows = self.rows[: sum(alive)]
        return events, now

    def _emit(self, step) -> Iterator[StreamEvent]:
        events, now = step
        for seq, new, delta in events:
            result = seq.result(now, self.k) if seq.finish_reason is not None else None
            yield StreamEvent(seq.index, new, delta, result)


__all__ = ["Engine", "GenerationResult", "StreamEvent", "TokenLogprob", "SamplingParams", "GenerationError"]
