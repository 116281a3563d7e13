"""Sampling: per-request parameters and the batched logit processing that turns logits into tokens.

Each row of a batch has its own `SamplingParams`; `BatchSampler` holds them as tensors so one
call processes the whole batch. Order (as in transformers): repetition/presence/frequency
penalties, temperature, top-k, top-p, min-p. Temperature 0 is greedy (argmax of the penalised
logits). Every row draws its random numbers from its own seeded generator, so a row's output
depends on its seed only, never on what else is in the batch.

Sampling uses the exponential race: argmax(probs / E) with E ~ Exp(1) per vocabulary entry picks
entry i with probability probs[i] (like multinomial), and vectorises over rows and positions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class GenerationError(ValueError):
    """A generation request that cannot run (bad parameter, prompt too long); the message says why."""


@dataclass
class SamplingParams:
    """How to pick tokens for one prompt. Defaults: plain sampling at temperature 1, 64 tokens."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; drop tokens below min_p * (probability of the likeliest)
    repetition_penalty: float = 1.0  # 1 = off; prompt and generated tokens (transformers' rule)
    presence_penalty: float = 0.0  # subtracted once from every token generated so far (OpenAI's rule)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # None: a fresh random seed
    stop: Sequence[str] = ()  # stop strings (the text ends before them); needs a tokenizer
    stop_token_ids: Sequence[int] = ()  # extra stop tokens besides end-of-text
    ignore_eos: bool = False  # keep going past the end-of-text token
    # None: no logprobs; n >= 0: the chosen token's logprob and the n likeliest alternatives.
    # Logprobs are those of the model's distribution (log_softmax of the raw logits), before
    # penalties, temperature and filtering.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)"),
            ("presence_penalty", math.isfinite(self.presence_penalty), "must be a finite number"),
            ("frequency_penalty", math.isfinite(self.frequency_penalty), "must be a finite number"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be >= 0 or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise GenerationError(f"sampling parameter {name}={getattr(self, name)!r} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class BatchSampler:
    """The sampling parameters of a batch as tensors, per-row generators, and penalty counts.

    `process` turns raw logits (B, T, V) into the logits to sample from (-inf where filtered);
    `choose` picks tokens (argmax for greedy rows, a draw for the others).
    """

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], vocab_size: int, device) -> None:
        B, V = len(params), vocab_size
        self.params = list(params)
        self.vocab_size = V
        self.device = device

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        self.greedy = col([p.greedy for p in params], torch.bool)
        self.all_greedy = all(p.greedy for p in params)
        self.temperature = col([p.temperature if not p.greedy else 1.0 for p in params])
        self.top_k = col([p.top_k if p.top_k > 0 else V for p in params], torch.long).clamp_max(V)
        self.top_p = col([p.top_p for p in params])
        self.min_p = col([p.min_p for p in params])
        sampling = [p for p in params if not p.greedy]
        self.any_top_k = any(0 < p.top_k < V for p in sampling)
        self.any_top_p = any(p.top_p < 1 for p in sampling)
        self.any_min_p = any(p.min_p > 0 for p in sampling)
        self.any_temperature = any(p.temperature != 1 for p in sampling)
        self.any_penalty = any(p.has_penalties for p in params)
        self.repetition = col([p.repetition_penalty for p in params])
        self.presence = col([p.presence_penalty for p in params])
        self.frequency = col([p.frequency_penalty for p in params])
        self.counts = self.prompt_mask = None
        if self.any_penalty:
            self.counts = torch.zeros(B, V, device=device)  # generated tokens, per id
            self.prompt_mask = torch.zeros(B, V, dtype=torch.bool, device=device)
            for i, ids in enumerate(prompts):
                if ids:
                    self.prompt_mask[i, torch.tensor(ids, device=device).clamp(0, V - 1)] = True
        self.generators: list[torch.Generator | None] = []
        for p in params:
            if p.greedy:
                self.generators.append(None)
                continue
            seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**63)
            self.generators.append(torch.Generator(device=device).manual_seed(seed))
        self.max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)

    # --- batch bookkeeping ---------------------------------------------------------------------
    def move_rows(self, src: list[int], dst: list[int]) -> None:
        """Row src[j] takes over slot dst[j] (the batch is being compacted)."""
        for s, d in zip(src, dst):
            self.params[d] = self.params[s]
            self.generators[d] = self.generators[s]
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for name in ("greedy", "temperature", "top_k", "top_p", "min_p", "repetition", "presence",
                     "frequency", "counts", "prompt_mask"):
            t = getattr(self, name)
            if t is not None:
                t[d] = t[s]

    def narrow(self, batch_size: int) -> None:
        self.params = self.params[:batch_size]
        self.generators = self.generators[:batch_size]
        for name in ("greedy", "temperature", "top_k", "top_p", "min_p", "repetition", "presence",
                     "frequency", "counts", "prompt_mask"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:batch_size])
        self._refresh_flags()

    def extend(self, other: "BatchSampler") -> None:
        """Append the rows of `other` after this sampler's rows (a continuous batch admitting new
        sequences); each row keeps its generator state and penalty counts."""
        V = self.vocab_size
        for name in ("counts", "prompt_mask"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None and theirs is None:
                continue
            dtype = torch.bool if name == "prompt_mask" else torch.float32
            mine = torch.zeros(len(self.params), V, dtype=dtype, device=self.device) if mine is None else mine
            theirs = torch.zeros(len(other.params), V, dtype=dtype, device=self.device) if theirs is None else theirs
            setattr(self, name, torch.cat([mine, theirs]))
        for name in ("greedy", "temperature", "top_k", "top_p", "min_p", "repetition", "presence", "frequency"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.params += other.params
        self.generators += other.generators
        self._refresh_flags()

    def _refresh_flags(self) -> None:
        """The batch-wide switches, from the rows present now (rows join and leave a continuous
        batch). Penalty counts, once allocated, stay up to date for rows that join later."""
        V = self.vocab_size
        sampling = [p for p in self.params if not p.greedy]
        self.all_greedy = not sampling
        self.any_top_k = any(0 < p.top_k < V for p in sampling)
        self.any_top_p = any(p.top_p < 1 for p in sampling)
        self.any_min_p = any(p.min_p > 0 for p in sampling)
        self.any_temperature = any(p.temperature != 1 for p in sampling)
        self.any_penalty = self.counts is not None and any(p.has_penalties for p in self.params)
        self.max_logprobs = max((p.logprobs for p in self.params if p.logprobs is not None), default=None)

    def record(self, tokens: list[list[int]]) -> None:
        """Count the tokens each row has just committed (for the penalties)."""
        if self.counts is None:
            return
        for i, ids in enumerate(tokens):
            for t in ids:
                self.counts[i, t] += 1

    # --- logits -> distribution ------------------------------------------------------------------
    def process(self, logits: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (B, T, V) -> the logits to pick from (float32, -inf for filtered tokens).

        Position j of T follows the committed tokens plus drafts[:, :j] (speculative decoding),
        so the penalties at position j also count those drafts.
        """
        x = logits.float()
        if self.any_penalty:
            x = self._penalise(x, drafts)
        if self.all_greedy:
            return x
        if self.any_temperature:
            x = x / self.temperature.view(-1, 1, 1)
        if self.any_top_k or self.any_top_p:
            x = self._top_k_top_p(x)
        if self.any_min_p:
            probs = x.softmax(-1)
            floor = probs.amax(-1, keepdim=True) * self.min_p.view(-1, 1, 1)
            x = x.masked_fill(probs < floor, float("-inf"))
        return x

    def _penalise(self, x: torch.Tensor, drafts: torch.Tensor | None) -> torch.Tensor:
        B, T, V = x.shape
        counts = self.counts.unsqueeze(1).expand(B, T, V)
        if drafts is not None and drafts.shape[1]:
            # position j has also seen drafts[:, :j]
            seen = torch.nn.functional.one_hot(drafts, V).float().cumsum(1)  # (B, T-1, V)
            counts = counts + torch.cat([torch.zeros_like(seen[:, :1]), seen], dim=1)
        appeared = counts > 0
        rep = self.repetition.view(-1, 1, 1)
        penalised = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(appeared | self.prompt_mask.unsqueeze(1), penalised, x)
        x = x - self.presence.view(-1, 1, 1) * appeared - self.frequency.view(-1, 1, 1) * counts
        return x

    def _top_k_top_p(self, x: torch.Tensor) -> torch.Tensor:
        sorted_x, order = x.sort(-1, descending=True)
        V = x.shape[-1]
        rank = torch.arange(V, device=x.device)
        drop = rank >= self.top_k.view(-1, 1, 1)  # (B, 1, V) beyond each row's k
        if self.any_top_p:
            probs = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of the better tokens; the best is always kept
            drop = drop | (before > self.top_p.view(-1, 1, 1))
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(-1, order, sorted_x)

    # --- choosing ----------------------------------------------------------------------------------
    def exponential_noise(self, T: int, V: int) -> torch.Tensor:
        """E ~ Exp(1) of shape (B, T, V) from each row's generator (ones for greedy rows)."""
        noise = torch.ones(len(self.params), T, V, device=self.device)
        for i, g in enumerate(self.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return noise.clamp_min_(1e-20)

    def uniforms(self, n: int) -> torch.Tensor:
        """U(0,1) of shape (B, n) from each row's generator (zeros for greedy rows)."""
        u = torch.zeros(len(self.params), n, device=self.device)
        for i, g in enumerate(self.generators):
            if g is not None:
                u[i].uniform_(generator=g)
        return u

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Processed logits (B, T, V) -> (tokens (B, T), probabilities (B, T, V) or None if all greedy)."""
        argmax = x.argmax(-1)
        if self.all_greedy:
            return argmax, None
        probs = x.softmax(-1)
        drawn = (probs / self.exponential_noise(x.shape[1], x.shape[2])).argmax(-1)
        return torch.where(self.greedy.unsqueeze(1), argmax, drawn), probs


def top_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, n: int):
    """Log-probabilities of `tokens` (B, T) and the n likeliest alternatives under the raw logits.

    Returns (chosen (B, T), top values (B, T, n), top ids (B, T, n)).
    """
    logp = raw_logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if n > 0:
        values, ids = logp.topk(min(n, logp.shape[-1]), dim=-1)
    else:
        values = ids = logp.new_zeros(*tokens.shape, 0)
    return chosen, values, ids


__all__ = ["GenerationError", "SamplingParams", "BatchSampler", "top_logprobs"]
