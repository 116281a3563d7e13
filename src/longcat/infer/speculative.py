"""Speculative decoding with the model's own multi-token-prediction heads as the draft model.

One speculative step for a row whose newest committed token x[N] sits at position N:

1. Draft. MTP depth d at position t reads the embedding of x[t+d] and the hidden state of depth
   d-1 at t (depth 0 = the main model's last layer, before the final norm) and predicts x[t+d+1]
   (the training alignment, lm.py). Depth d run at position N-1 therefore proposes draft d =
   x[N+d]. With more drafts than heads, the last head runs on at N, N+1, ... with its own output
   standing in for the missing hidden state (as serving stacks reuse a single MTP layer).
2. Verify. The main model runs once over [x[N], draft 1..k] at positions N..N+k: logits p_0..p_k,
   where p_j is the model's distribution for x[N+j+1] given the drafts before it.
3. Accept. Greedy: keep drafts while they equal argmax p_j, then append argmax p at the first
   mismatch (or the bonus token after k hits), so the output is exactly plain greedy decoding.
   Sampling: the standard rejection scheme (Leviathan et al. 2023, Chen et al. 2023): keep draft
   j with probability min(1, p/q); at the first rejection draw from norm(max(0, p - q)); after k
   hits draw from p_k. The tokens are distributed exactly as plain sampling from p.

Caches. Each MTP depth has its own latent-cache sublayer (2L + d). Its slot t must hold the keys
of the *true* pair (h_{d-1}[t], x[t+d]); after a step that is known for t <= N' - d (N' the new
newest position). `frontier[d]` counts those slots; the next draft of depth d recomputes from
there to N'-1, so draft-based entries are always overwritten before a later query can see them.
The hidden states of depths 0..D-2 are kept by position for the depth above.

Draft vocabulary (FR-Spec, Zhao et al. 2025; EAGLE-3 drafts over a reduced vocabulary too). Most of
a draft's cost at a small hidden size is the output head, V x H per draft. The drafts may come from
the first N token ids only: the head runs over the contiguous slice `lm_head.weight[:N]` (a view,
no gather, no copy), and an argmax there is a full id as it is. The verify forward keeps the full
vocabulary, so greedy output stays exactly plain greedy decoding. A sampling row draws its draft
from q restricted to the subset (q = 0 elsewhere): the rejection rule needs only that the draft
was drawn from q, so the tokens are still distributed exactly as plain sampling; only acceptance
changes. It pays off when the low ids are the frequent ones, as in a BPE whose ids follow its
merges (`default_draft_vocab`).

Steady state. After the first draft (which runs over the whole prompt), the windows are short:
depth d's frontier trails n by at most k + D positions. Every depth then runs over a window of
exactly W = k + D positions ending at n-1 (the positions left of the frontier are recomputed from
their true inputs, which rewrites the same keys), so the compiled step has one draft graph per
row bucket instead of one per window width, and the output head runs in the same graph on the
last position only (`DecodeStep.draft`).
"""

from __future__ import annotations

import operator

import torch

from ..data.tokenizer import SPECIAL_TOKENS
from ..model import LongCatForCausalLM
from ..model.layers import linear
from .batch import DecodeBatch, token_history
from .sampling import BatchSampler, GenerationError

# Draft vocabulary of a model whose tokenizer is one of ours (`default_draft_vocab`).
DRAFT_VOCAB = 2048


# ------------------------------------------------------------------------------------------------
# draft vocabulary


def default_draft_vocab(vocab_size: int, tokenizer) -> int:
    """The draft vocabulary to use by default: min(vocab_size, DRAFT_VOCAB) for a tokenizer of ours
    (byte-level BPE with our special tokens at ids 0, 1, ...: its ids follow the BPE merges, so
    the low ids are the frequent tokens), else the full vocabulary (a Hugging Face tokenizer's id
    order need not follow frequency; a model without a tokenizer tells nothing)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None or type(hf.model).__name__ != "BPE":
        return vocab_size
    if [hf.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        return vocab_size
    return min(vocab_size, DRAFT_VOCAB)


def check_draft_vocab(draft_vocab: int, vocab_size: int) -> int:
    """A requested draft vocabulary (0 = the full vocabulary) -> the number of ids drafted from."""
    try:
        if isinstance(draft_vocab, bool):
            raise TypeError
        draft_vocab = operator.index(draft_vocab)
    except TypeError:
        raise GenerationError(f"draft_vocab must be an integer token count, got {draft_vocab!r}") from None
    if not 0 <= draft_vocab <= vocab_size:
        raise GenerationError(f"draft_vocab must be between 1 and the vocabulary size {vocab_size} (or 0 for the "
                              f"full vocabulary), got {draft_vocab}")
    return draft_vocab or vocab_size


def draft_head(model: LongCatForCausalLM, normed: torch.Tensor, vocab: int) -> torch.Tensor:
    """The output head over the first `vocab` token ids: normed (..., H) -> logits (..., vocab)."""
    if vocab >= model.config.vocab_size:
        return model.head(normed)
    return linear(normed, model.lm_head.weight[:vocab])  # a view of the first rows: nothing copied


# ------------------------------------------------------------------------------------------------
# acceptance rules (pure functions, testable in isolation)


def greedy_accept(targets: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """targets (B, k+1) argmax tokens of p_0..p_k, drafts (B, k) -> accepted draft count (B,)."""
    hits = (drafts == targets[:, : drafts.shape[1]]).long()
    return hits.cumprod(1).sum(1)


def rejection_accept(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule, vectorised over rows.

    p (B, k+1, V) target probabilities, q (B, k, V) draft probabilities, drafts (B, k) drawn from
    q, u (B, k) uniform numbers, noise (B, V) Exp(1) numbers for the final draw.
    Returns (accepted draft count a (B,), the token after them (B,)).
    """
    B, k = drafts.shape
    idx = drafts.unsqueeze(-1)
    p_draft = p[:, :k].gather(-1, idx).squeeze(-1)
    q_draft = q.gather(-1, idx).squeeze(-1)
    hits = (u * q_draft < p_draft).long()  # accept with probability min(1, p/q)
    accepted = hits.cumprod(1).sum(1)  # (B,)
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, accepted]  # (B, V): p at the first rejection, or p_k after k hits
    q_next = q[rows, accepted.clamp_max(k - 1)]
    residual = (p_next - q_next).clamp_min(0)
    # a rejection can only happen where p < q somewhere, so the residual has mass there; guard
    # the degenerate p == q case (rounding) by falling back to p
    rejected = (accepted < k) & (residual.sum(-1) > 0)
    dist = torch.where(rejected.unsqueeze(-1), residual, p_next)
    return accepted, (dist / noise).argmax(-1)


# ------------------------------------------------------------------------------------------------
# drafting with the MTP heads


class MTPDrafter:
    """Proposes `num_draft` tokens per row with the model's MTP heads, over the latent cache."""

    def __init__(self, model: LongCatForCausalLM, runner, num_draft: int, batch_size: int, max_len: int,
                 chunk: int, draft_vocab: int | None = None) -> None:
        """runner: the engine's DecodeStep (step.py), whose mtp() runs one head over the cache.
        draft_vocab: draft from the first draft_vocab token ids only (None: all of them)."""
        if not model.mtp:
            raise ValueError("this model has no MTP heads (mtp_num_layers = 0): speculative decoding needs them")
        self.model = model
        self.runner = runner
        self.k = num_draft
        V = model.config.vocab_size
        self.vocab = V if draft_vocab is None else check_draft_vocab(draft_vocab, V)
        self.depths = min(num_draft, len(model.mtp))  # heads used; the last one also runs on
        self.chunk = chunk
        H = model.config.hidden_size
        p = model.embed_tokens.weight
        # hidden[0]: main model (pre-norm) by position; hidden[d]: MTP depth d, feeding depth d+1
        self.hidden = torch.zeros(self.depths, batch_size, max_len, H, dtype=p.dtype, device=p.device)
        # frontier[d-1][i]: depth d's cache holds true entries for positions < frontier
        self.frontier = torch.zeros(self.depths, batch_size, dtype=torch.long, device=p.device)
        self.history = model.config.oe_neighbor_num - 1 if model.config.ngram_enabled else 0
        # whether every row's frontiers trail its n by at most k + D (true after any draft; a row
        # that joins a batch with frontier 0 makes it false until the next `draft`)
        self.steady = False
        W = self.k + self.depths
        self._step_offsets = torch.arange(-W, self.k + 1, device=p.device)  # a fused step's positions - n
        self._depth_offsets = torch.arange(self.depths, device=p.device).unsqueeze(1)  # (D, 1): depth d - 1

    # batch bookkeeping (DecodeBatch.extra)
    def move_rows(self, src: list[int], dst: list[int]) -> None:
        s, d = torch.tensor(src, device=self.hidden.device), torch.tensor(dst, device=self.hidden.device)
        self.hidden[:, d] = self.hidden[:, s]
        self.frontier[:, d] = self.frontier[:, s]

    def narrow(self, size: int) -> None:
        self.hidden = self.hidden[:, :size]
        self.frontier = self.frontier[:, :size]

    def store_main_hidden(self, positions: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep the main model's pre-norm hidden states (B, T, H) at positions (B, T)."""
        H = hidden.shape[-1]
        self.hidden[0].scatter_(1, positions.unsqueeze(-1).expand(-1, -1, H), hidden.to(self.hidden.dtype))

    def _head_inputs(self, depth: int, batch: DecodeBatch, positions: torch.Tensor):
        """The tokens MTP head `depth` reads at positions (B, T), x[t + depth], and their n-gram state."""
        L = batch.tokens.shape[1]
        ids = batch.tokens.gather(1, (positions + depth).clamp_max(L - 1))
        history = None
        if self.history:
            history = token_history(batch.tokens, positions[:, 0] + depth, self.history)
        return ids, history

    def _run_head(self, depth: int, batch: DecodeBatch, positions: torch.Tensor, prev: torch.Tensor):
        """MTP head `depth` (1-based) at positions (B, T) with previous hidden prev (B, T, H)
        -> (hidden, normed hidden)."""
        ids, history = self._head_inputs(depth, batch, positions)
        return self.runner.mtp(depth, ids, prev, positions, batch.cache, history)

    def _draft_last(self, depth: int, batch: DecodeBatch, positions: torch.Tensor, prev: torch.Tensor):
        """As _run_head, but -> (hidden (B, T, H), logits of the last position (B, V)), one graph."""
        ids, history = self._head_inputs(depth, batch, positions)
        return self.runner.draft(depth, ids, prev, positions, batch.cache, history, vocab=self.vocab)

    def draft(self, batch: DecodeBatch, sampler: BatchSampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write k drafts per row into batch.tokens at n+1..n+k.

        Returns (drafts (B, k), draft probabilities q (B, k, V), or None when every row is greedy;
        q is 0 outside the draft vocabulary).
        """
        n, B = batch.n, batch.size
        H = self.hidden.shape[-1]
        L = batch.tokens.shape[1]
        W = self.k + self.depths  # the steady-state window
        drafts, probs = [], []
        last_h = None
        for d in range(1, self.depths + 1):
            # one right-aligned window per row that ends at position n-1 and covers the frontier
            width, shortest = torch.stack([(n - self.frontier[d - 1]).max(), n.min()]).tolist()
            if width <= W <= shortest:
                positions = (n - W).unsqueeze(1) + torch.arange(W, device=n.device)  # (B, W)
                gather = positions.unsqueeze(-1).expand(-1, -1, H)
                h, logits = self._draft_last(d, batch, positions, self.hidden[d - 1].gather(1, gather))
                if d < self.depths:
                    self.hidden[d].scatter_(1, gather, h)
                last_h = h[:, -1]
            else:
                last_h, logits = self._draft_window(d, batch, width)
            token, q = self._pick(logits, sampler)
            batch.tokens.scatter_(1, (n + d).unsqueeze(1), token.unsqueeze(1))
            self.frontier[d - 1] = (n - d + 1).clamp_min(0)
            drafts.append(token)
            probs.append(q)
        # more drafts than heads: the last head runs on, its output standing in for the hidden state
        for j in range(self.depths + 1, self.k + 1):
            positions = (n + j - self.depths - 1).unsqueeze(1)  # (B, 1)
            h, logits = self._draft_last(self.depths, batch, positions, last_h.unsqueeze(1))
            last_h = h[:, 0]
            token, q = self._pick(logits, sampler)
            batch.tokens.scatter_(1, (n + j).unsqueeze(1), token.unsqueeze(1))
            drafts.append(token)
            probs.append(q)
        self.steady = True
        q_all = None if probs[0] is None else torch.stack(probs, 1)
        return torch.stack(drafts, 1), q_all

    def greedy_step(self, batch: DecodeBatch, newest: list[int]) -> list[list[int]] | None:
        """A whole greedy speculative step (draft chain, verify, acceptance) as one compiled graph,
        for a batch of greedy rows in the steady state; None where that does not apply (the caller
        then runs `draft` and the verify separately). newest: each row's n (the position of its
        newest committed token) as the host knows it, so that deciding costs no device read.

        Commits the emitted tokens into batch.tokens, advances batch.n, stores the hidden states
        and advances the frontiers, as `draft` and the engine's step do. Returns per row the
        emitted tokens (k+1, of which the first a+1 count) followed by a, the accepted draft count:
        the step's only device-to-host transfer.
        """
        W = self.k + self.depths
        top = max(newest)
        # steady: every depth's frontier within the window (any draft leaves it so), which starts at 0 or later
        if not self.steady or min(newest) < W or not self.runner.fuses_speculation(batch.size, self.k, W,
                                                                                      top + self.k + 1):
            return None
        n = batch.n
        H = self.hidden.shape[-1]
        positions = n.unsqueeze(1) + self._step_offsets  # (B, W+k+1): n-W .. n+k
        gather = positions[:, :W].unsqueeze(-1).expand(-1, -1, H)
        if self.history:
            seq = token_history(batch.tokens, n + 1, W + 1 + self.history)  # n-W-history .. n
        else:
            seq = batch.tokens.gather(1, positions[:, : W + 1])  # n-W .. n
        emitted, hidden, deeper = self.runner.speculate_greedy(
            seq, self.hidden[0].gather(1, gather), positions, batch.cache, self.depths, self.k, self.history,
            span=top + self.k + 1, vocab=self.vocab)
        for d in range(1, self.depths):
            self.hidden[d].scatter_(1, gather, deeper[d - 1])
        verify = positions[:, W:]
        self.store_main_hidden(verify, hidden)
        # depth d's cache is true up to n-d (it read x[t+d] for t <= n-d); n >= W >= d here
        torch.sub(n, self._depth_offsets, out=self.frontier)
        batch.tokens.scatter_(1, verify + 1, emitted[:, :-1])
        n += emitted[:, -1] + 1
        return emitted.tolist()

    def _draft_window(self, d: int, batch: DecodeBatch, width: int):
        """Depth d over a window of `width` positions per row ending at n-1 (the first draft after a
        prefill: the whole prompt, in chunks) -> (hidden, logits over the draft vocabulary) at
        position n-1 (B, H), (B, vocab)."""
        n, B = batch.n, batch.size
        H = self.hidden.shape[-1]
        L = batch.tokens.shape[1]
        start = (n - width).clamp_min(0)
        target_col = n - 1 - start  # the column of position n-1
        last_normed = self.hidden.new_zeros(B, H)
        last_h = self.hidden.new_zeros(B, H)
        for c0 in range(0, width, self.chunk):
            c1 = min(width, c0 + self.chunk)
            positions = start.unsqueeze(1) + torch.arange(c0, c1, device=n.device)  # (B, T)
            gather = positions.clamp_max(L - 1).unsqueeze(-1).expand(-1, -1, H)
            prev = self.hidden[d - 1].gather(1, gather)
            h, normed = self._run_head(d, batch, positions, prev)
            if d < self.depths:
                self.hidden[d].scatter_(1, gather, h)
            col = (target_col - c0).clamp(0, c1 - c0 - 1).view(B, 1, 1).expand(B, 1, H)
            here = ((target_col >= c0) & (target_col < c1)).unsqueeze(1)
            last_normed = torch.where(here, normed.gather(1, col).squeeze(1), last_normed)
            last_h = torch.where(here, h.gather(1, col).squeeze(1), last_h)
        return last_h, self.runner.head(last_normed, vocab=self.vocab)

    def _pick(self, logits: torch.Tensor, sampler: BatchSampler):
        """Draft logits over the draft vocabulary (B, vocab) -> (tokens (B,), q (B, V) or None)."""
        V = self.model.config.vocab_size
        if logits.shape[-1] < V and (not sampler.all_greedy or sampler.any_penalty):
            # the sampler's penalties and q index the full vocabulary: ids beyond the draft
            # vocabulary get -inf, so q is 0 there (a greedy argmax over the slice needs nothing)
            logits = torch.cat([logits, logits.new_full((logits.shape[0], V - logits.shape[-1]), float("-inf"))], -1)
        tokens, probs = sampler.choose(sampler.process(logits.unsqueeze(1)))
        return tokens[:, 0], None if probs is None else probs[:, 0]


__all__ = ["DRAFT_VOCAB", "MTPDrafter", "check_draft_vocab", "default_draft_vocab", "draft_head", "greedy_accept",
           "rejection_accept"]
