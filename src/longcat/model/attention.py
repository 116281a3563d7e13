"""Multi-head latent attention (MLA) and the LongCat sparse-attention indexer.

Two execution paths share one set of weights:
- training/prefill without a cache: expand the latent into per-head keys and values and run
  `scaled_dot_product_attention` (causal, or masked to the sparse selection);
- with a latent cache: the *absorbed* form. The nope part of `kv_b_proj` is folded into the
  query and its value part into the output, so attention runs directly over the cached
  `[c_kv, k_rope]` (kv_lora + rope values per token) as one shared key/value head. This is the
  decode path, eager and compiled alike: the cache is written in place, the shared key head is
  never copied per query head, and every weight product goes through `layers.linear`. When LSA
  selects, it runs over the gathered `index_topk` selected latents per query instead of the whole
  cache, so its cost per query does not grow with the context (`_selected_path`).

What does grow with the context is LSA's indexer: every query scores every cached key. Over a
cache that is one tiled pass over the (feature-major) indexer keys into reusable buffers
(`Indexer._scores_by_tile`), then `select_positions` turns the scores into cache positions with one
more pass (block maxima; no sort, no (queries, keys) masks). Without a cache (training, a full
forward) the same selection is the keep-mask of `select_tokens` on SDPA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .fp8 import dense_weight, is_fp8
from .layers import RMSNorm, apply_rope, linear


@dataclass
class AttentionContext:
    """Per-forward inputs shared by every attention sublayer."""

    cos: torch.Tensor  # (B|1, T, rope/2)
    sin: torch.Tensor
    positions: torch.Tensor  # (B|1, T) absolute positions of the queries
    cache: "object | None" = None  # LatentCache, see cache.py
    sparse: bool = True  # LSA selects tokens (False: dense warm-up, indexer still trained)
    indexer_loss: bool = False  # compute the indexer's KL loss (training)


class Indexer(nn.Module):
    """Lightning indexer: scores every past token for every query, cheaply.

    score(t, s) = sum_h w_h(t) * relu(q_h(t) . k(s)) * index_dim^-0.5
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = RMSNorm(self.head_dim, config.mla_norm_eps)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rope_dim
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, index_dim)."""
        return self._rope(self.k_norm(linear(x, self.wk)), cos, sin)

    def scores(
        self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        workspace: "Callable[[str, tuple, torch.dtype], torch.Tensor] | None" = None,
    ) -> torch.Tensor:
        """Index scores (B, T, S) in fp32 of the T queries against S keys (no mask applied).

        Two batched products: the per-head logits (B, T*h, S), then their head-weighted sum. Without
        autograd they run tile by tile over the keys (`_scores_by_tile`); `workspace(name, shape,
        dtype)` then supplies reusable buffers, so a decode step allocates nothing of the context's
        size.
        """
        B, T, _ = x.shape
        S = keys.shape[1]
        h = self.n_heads
        # Scores in fp32 even under autocast (the products would otherwise run in bf16).
        with torch.autocast(x.device.type, enabled=False):
            q, weights = self._queries(x, q_latent, cos, sin)
            if torch.is_grad_enabled():  # training: whole, differentiable products
                logits = torch.bmm(q, keys.float().transpose(1, 2)).relu_()  # (B, T*h, S)
                return torch.bmm(weights.view(B * T, 1, h), logits.view(B * T, h, S)).view(B, T, S)
            return self._scores_by_tile(q, weights, keys, workspace)

    def _queries(self, x, q_latent, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 queries (B, T*h, d) and head weights (B, T, h); call with autocast off."""
        B, T, _ = x.shape
        h, d = self.n_heads, self.head_dim
        q = self._rope(linear(q_latent, self.wq_b).view(B, T, h, d), cos, sin)
        # both scales (1/sqrt(heads) on the head weights, 1/sqrt(index_dim) on the sum) folded in
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * (h**-0.5 * d**-0.5)  # (B, T, h)
        return q.float().reshape(B, T * h, d), weights

    @torch.no_grad()
    def select(
        self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        positions: torch.Tensor, config: ModelConfig,
        workspace: "Callable[[str, tuple, torch.dtype], torch.Tensor] | None" = None,
    ) -> GatheredSelection:
        """`select_positions(scores(...), positions, config)` for queries over a cache, without the
        (B, T, S) scores: the same positions.

        The selection only needs each row's block maxima (of the masked scores) and then the scores
        of its at most 2m - 1 candidate blocks (see `select_positions`). So the tile loop keeps a
        tile's scores in the core's cache just long enough to mask it and take its block maxima, and
        the candidates' scores are recomputed from their gathered keys (the same products, so the
        same values). A long prefill chunk then never writes or re-reads B*T*S scores. Rows too short
        for a block pre-selection (the candidates would be the whole row), rows of fewer than
        MIN_KEYS_PER_CANDIDATE keys per candidate (recomputing the candidates would cost more than
        the scores' memory traffic saves), single queries (decode steps) and traced steps (a compiled
        decode, whose span is symbolic) take the scores path.
        """
        k, init, local = config.index_topk, config.index_init_tokens, config.index_local_tokens
        block = SELECTION_BLOCK
        B, T, _ = x.shape
        S = keys.shape[1]
        m = k - init - local
        candidates_per_query = (2 * m - 1) * block
        if (torch.compiler.is_compiling() or T == 1 or m <= 0 or -(-S // block) <= 2 * m - 1
                or S < MIN_KEYS_PER_CANDIDATE * candidates_per_query):
            return select_positions(self.scores(x, q_latent, keys, cos, sin, workspace=workspace), positions, config)
        with torch.autocast(x.device.type, enabled=False):
            q, weights = self._queries(x, q_latent, cos, sin)
            pos = positions.expand(B, T)
            last_middle = (pos - local).unsqueeze(-1)  # (B, T, 1): the latest key chosen by score
            block_max = self._block_maxima(q, weights, keys, last_middle, init, block, workspace)
            cand_pos, padding = _candidate_blocks(block_max, m, S, block)  # (B, T, C)
            h, d, C = self.n_heads, self.head_dim, cand_pos.shape[-1]
            out = None if workspace is None else workspace("index_candidate_keys", (B * d * T * C,), keys.dtype)
            cand_keys = _block_keys(keys, cand_pos[..., ::block] // block, block, out)  # (B, T, d, C)
            cand_keys = cand_keys.reshape(B * T, d, C).float()  # a view for one row
            logits = torch.bmm(q.view(B * T, h, d), cand_keys).relu_()  # (B*T, h, C)
            candidates = torch.bmm(weights.view(B * T, 1, h), logits).view(B, T, C)
            candidates.masked_fill_(padding | (cand_pos < init) | (cand_pos > last_middle), float("-inf"))
        return _assemble(_stable_middle(candidates, cand_pos, pos < k, m), pos, config)

    def _block_maxima(self, q, weights, keys, last_middle, init, block, workspace) -> torch.Tensor:
        """q (B, T*h, d), weights (B, T, h), keys (B, S, d), last_middle (B, T, 1) -> (B, T, nb): the
        maximum of each block of `block` keys of the scores masked as `select_positions` masks them
        (keys before `init` or after last_middle at -inf), tile by tile as in `_scores_by_tile`."""
        B, M, _ = q.shape
        h = self.n_heads
        T, S = M // h, keys.shape[1]
        # a tile's logits and scores together within BLOCK_TILE_BYTES; whole blocks per tile, so
        # every block's maximum comes from one tile
        tile = min(S, max(MIN_TILE_KEYS, BLOCK_TILE_BYTES // (4 * B * (M + T))))
        tile = max(block, tile // block * block)
        size = B * M * tile + B * T * tile
        buffer = (workspace("index_logits", (size,), torch.float32) if workspace is not None
                  else torch.empty(size, device=q.device))
        nb = -(-S // block)
        block_max = torch.empty(B, T, nb, device=q.device)
        lo = max(int(last_middle.min()) + 1, 0)  # keys from here on may lie past a row's last middle key
        keys_t = keys.transpose(1, 2)  # (B, d, S)
        w = weights.view(B * T, 1, h)
        for s0 in range(0, S, tile):
            n = min(tile, S - s0)
            logits = buffer[: B * M * n].view(B, M, n)
            block_keys = keys_t[:, :, s0 : s0 + n]
            torch.bmm(q, block_keys if block_keys.dtype == torch.float32 else block_keys.float(), out=logits).relu_()
            part = buffer[B * M * tile : B * M * tile + B * T * n].view(B * T, 1, n)
            torch.bmm(w, logits.view(B * T, h, n), out=part)
            part = part.view(B, T, n)
            if s0 < init:
                part[..., : init - s0] = float("-inf")
            if s0 + n > lo:
                part.masked_fill_(torch.arange(s0, s0 + n, device=q.device) > last_middle, float("-inf"))
            full = n // block * block
            b0 = s0 // block
            torch.amax(part[..., :full].unflatten(-1, (full // block, block)), dim=-1,
                       out=block_max[..., b0 : b0 + full // block])
            if full < n:
                block_max[..., -1] = part[..., full:].amax(-1)
        return block_max

    def _scores_by_tile(self, q, weights, keys, workspace) -> torch.Tensor:
        """q (B, T*h, d) fp32, weights (B, T, h), keys (B, S, d) -> scores (B, T, S).

        Per tile of keys: the logits into a buffer of SCORE_TILE_BYTES (it stays in the core's
        cache), relu, the head-weighted sum into the scores. Memory traffic is then the keys once
        (a narrower key dtype widened per tile, never as a whole) and the scores once, instead of
        also writing and twice reading (T*h, S) logits.
        """
        B, M, _ = q.shape
        h = self.n_heads
        T, S = M // h, keys.shape[1]
        tile = min(S, max(MIN_TILE_KEYS, SCORE_TILE_BYTES // (4 * B * M)))
        # logits of a tile, then (several query rows) its scores before they go to their rows: a
        # product into a strided `out` would run batch by batch
        size = B * M * tile + (B * T * tile if B * T > 1 else 0)
        if workspace is not None:
            scores = workspace("index_scores", (B, T, S), torch.float32)
            buffer = workspace("index_logits", (size,), torch.float32)
        else:
            scores = torch.empty(B, T, S, device=q.device)
            buffer = torch.empty(size, device=q.device)
        keys_t = keys.transpose(1, 2)  # (B, d, S): contiguous along the positions in the cache's layout
        w = weights.view(B * T, 1, h)
        for s0 in range(0, S, tile):
            n = min(tile, S - s0)
            logits = buffer[: B * M * n].view(B, M, n)
            block = keys_t[:, :, s0 : s0 + n]
            torch.bmm(q, block if block.dtype == torch.float32 else block.float(), out=logits).relu_()
            if B * T == 1:
                torch.bmm(w, logits.view(1, h, n), out=scores.view(1, 1, S)[:, :, s0 : s0 + n])
            else:
                part = buffer[B * M * tile : B * M * tile + B * T * n].view(B * T, 1, n)
                torch.bmm(w, logits.view(B * T, h, n), out=part)
                scores[:, :, s0 : s0 + n] = part.view(B, T, n)
        return scores


# Bytes of index logits computed per tile of keys (what stays in a core's L2 cache), and the
# fewest keys per tile (so a long prefill chunk still takes wide products).
SCORE_TILE_BYTES = 2 * 2**20
# Bytes of index logits and scores per tile of `Indexer._block_maxima`: it makes four passes over
# them (relu, head-weighted sum, masks, block maxima), so they should stay well inside a core's L2.
BLOCK_TILE_BYTES = 3 * 2**18
MIN_TILE_KEYS = 256
# `Indexer.select` takes the block-maxima path from this many cached keys per candidate key of a
# query ((2m - 1) blocks of SELECTION_BLOCK keys) on.
MIN_KEYS_PER_CANDIDATE = 16
# Keys per block of the top-k pre-selection (`select_positions`).
SELECTION_BLOCK = 128


def select_tokens(scores: torch.Tensor, causal: torch.Tensor, config: ModelConfig) -> torch.Tensor | None:
    """The LSA selection: for each query, `index_topk` keys, always including the first
    `index_init_tokens` (sinks) and the last `index_local_tokens` (local window).

    scores, causal: (B, T, S); returns a boolean keep-mask (B, T, S), or None when every query
    sees at most `index_topk` keys (then sparse attention is exactly dense).
    """
    S = scores.shape[-1]
    if int(causal.sum(-1).max()) <= config.index_topk:
        return None
    key_pos = torch.arange(S, device=scores.device)
    # the query's own position is its last causal key
    query_pos = causal.sum(-1, keepdim=True, dtype=torch.int32) - 1  # (B, T, 1)
    forced = (key_pos < config.index_init_tokens) | (key_pos > query_pos - config.index_local_tokens)
    choice = scores.float().masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    # What a stable descending sort would keep, without sorting the row: every key above the k-th
    # largest score, then the earliest of the keys equal to it. relu makes exact ties common, and
    # topk alone breaks them in an order that depends on the tensor width (a cached decode would pick
    # differently from a full forward); columns past the query are -inf and come last.
    k = config.index_topk
    kth = choice.topk(k, dim=-1).values[..., -1:]  # (B, T, 1)
    above = choice > kth
    tied = choice == kth
    room = k - above.sum(-1, keepdim=True, dtype=torch.int32)  # (B, T, 1) ties still taken
    keep = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))
    return keep & causal


@dataclass
class GatheredSelection:
    """LSA's choice as positions in the latent cache, found once per layer (sublayer 0) and reused
    by the second sublayer: index (B, T, k) of the kept keys, valid (B, T, k) False on padding
    (rows that keep fewer than k)."""

    index: torch.Tensor
    valid: torch.Tensor


def select_positions(
    scores: torch.Tensor, positions: torch.Tensor, config: ModelConfig, block: int | None = None
) -> GatheredSelection:
    """The selection of `select_tokens`, as cache positions, for queries over a latent cache.

    scores (B, T, S) the index scores (overwritten: its sinks and local windows are masked in
    place), positions (B|1, T) the queries' positions (a query at p sees keys 0..p). Returns index
    (B, T, index_topk): the sinks, the middle keys chosen by score, the local window; a query that
    sees at most index_topk keys keeps them all (valid marks which).

    The chosen middle keys are exactly the stable sort's (ties to the earlier key), found without
    a top-k over the row: the row's blocks of `block` keys (default SELECTION_BLOCK) are ranked by
    their maximum; with tau the m-th largest block maximum (m middle keys to choose), every key of
    the answer lies in a block whose maximum is > tau, or in one of the first m blocks whose maximum
    equals tau (a block reaching tau holds a key equal to it, and the answer takes equal keys
    earliest first). Those at most 2m - 1 blocks, in position order, are the candidates; the stable
    choice among them is the answer. One pass over the scores (the block maxima) plus work on
    O(m * block) candidates.
    """
    k, init, local = config.index_topk, config.index_init_tokens, config.index_local_tokens
    block = block or SELECTION_BLOCK
    B, T, S = scores.shape
    device = scores.device
    pos = positions.expand(B, T)
    slots = torch.arange(k, device=device)
    short = pos < k  # (B, T): sees at most k keys, keeps them all
    short_index = slots.expand(B, T, k)
    short_valid = slots <= pos.unsqueeze(-1)
    m = k - init - local  # middle keys chosen by score
    if bool(short.all()):
        return GatheredSelection(short_index, short_valid)

    # The middle of each row: keys init .. p - local (sinks, window and keys past p masked to -inf).
    # Only the columns from the earliest query's window onwards can hold a window or a future key.
    scores[..., :init] = float("-inf")
    lo = max(int(pos.min()) - local + 1, 0)
    tail = torch.arange(lo, S, device=device)
    scores[..., lo:].masked_fill_(tail > (pos - local).unsqueeze(-1), float("-inf"))

    if m > 0:
        if -(-S // block) <= 2 * m - 1:  # the candidates would be the whole row
            candidates, cand_pos = scores, torch.arange(S, device=device).expand(B, T, S)
        else:
            full = S // block * block
            block_max = scores[..., :full].unflatten(-1, (S // block, block)).amax(-1)  # (B, T, nb)
            if full < S:
                block_max = torch.cat([block_max, scores[..., full:].amax(-1, keepdim=True)], dim=-1)
            cand_pos, padding = _candidate_blocks(block_max, m, S, block)
            candidates = scores.gather(-1, cand_pos.clamp_max(S - 1)).masked_fill_(padding, float("-inf"))
        middle = _stable_middle(candidates, cand_pos, short, m)
    else:
        middle = pos.new_empty(B, T, 0)
    return _assemble(middle, pos, config)


def _block_keys(keys: torch.Tensor, blocks: torch.Tensor, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """keys (B, S, d) (feature-major storage), blocks (B, T, n) block numbers -> (B, T, d, n*block):
    the keys of those blocks, copied in runs of `block` contiguous positions per feature, into `out`
    (B * d * T * n * block values in the keys' dtype) when given. Positions past S in a partial last
    block hold garbage (the caller masks them)."""
    B, S, d = keys.shape
    T, n = blocks.shape[1:]
    whole = S // block  # at least one: the caller has more than 2m - 1 blocks
    keys_t = keys.transpose(1, 2)  # (B, d, S)
    by_block = keys_t[..., : whole * block].unflatten(-1, (whole, block))  # (B, d, whole, block)
    if out is None:
        out = torch.empty(B, d, T * n, block, dtype=keys.dtype, device=keys.device)
    out = out.view(B, d, T * n, block)
    for b in range(B):
        at = blocks[b].clamp_max(whole - 1).flatten()
        for f in range(d):  # per feature a contiguous (whole, block) source: rows copied whole
            torch.index_select(by_block[b, f], 0, at, out=out[b, f])
        if whole * block < S:  # the partial last block: its keys over those of the clamped one
            rest = S - whole * block
            out[b].view(d, T, n, block)[:, blocks[b] == whole, :rest] = keys_t[b, :, whole * block :].unsqueeze(1)
    return out.view(B, d, T, n * block).transpose(1, 2)  # (B, T, d, n*block)


def _candidate_blocks(block_max: torch.Tensor, m: int, S: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """block_max (B, T, nb) of rows of S keys -> the positions (B, T, (2m-1)*block) of the candidate
    blocks in position order, and which of them are padding (fewer chosen blocks, or past S)."""
    nb = block_max.shape[-1]
    device = block_max.device
    tau = block_max.topk(m, dim=-1).values[..., -1:]  # (B, T, 1)
    at_tau = block_max == tau
    chosen = (block_max > tau) | (at_tau & (at_tau.cumsum(-1) <= m))
    # the chosen blocks in position order: rank by (nb - block), 0 for the rest (padding)
    earliest = torch.where(chosen, nb - torch.arange(nb, device=device), 0).topk(2 * m - 1, dim=-1).values
    blocks = (nb - earliest).clamp_max(nb - 1)  # (B, T, 2m-1)
    cand_pos = (blocks.unsqueeze(-1) * block + torch.arange(block, device=device)).flatten(-2)
    padding = (earliest == 0).repeat_interleave(block, dim=-1) | (cand_pos >= S)
    return cand_pos, padding


def _stable_middle(candidates: torch.Tensor, cand_pos: torch.Tensor, short: torch.Tensor, m: int) -> torch.Tensor:
    """The stable choice of m among candidates (B, T, C) at cand_pos: all above the m-th value, then
    the earliest equal ones. -> (B, T, m) positions (garbage on short rows)."""
    B, T, _ = candidates.shape
    kth = candidates.topk(m, dim=-1).values[..., -1:]
    above = candidates > kth
    tied = candidates == kth
    room = m - above.sum(-1, keepdim=True, dtype=torch.int32)
    keep = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))  # exactly m per long row
    # short rows hold garbage: give them m columns too so every row has m
    keep = torch.where(short.unsqueeze(-1), torch.arange(keep.shape[-1], device=keep.device) < m, keep)
    return cand_pos.gather(-1, keep.nonzero()[:, -1].view(B, T, m))


def _assemble(middle: torch.Tensor, pos: torch.Tensor, config: ModelConfig) -> GatheredSelection:
    """Sinks, the middle (B, T, m) and the local window of queries at pos (B, T); a query that
    sees at most index_topk keys keeps them all."""
    k, init, local = config.index_topk, config.index_init_tokens, config.index_local_tokens
    B, T = pos.shape
    slots = torch.arange(k, device=pos.device)
    short = pos < k
    window = pos.unsqueeze(-1) - local + 1 + torch.arange(local, device=pos.device)
    sinks = slots[:init].expand(B, T, init)
    index = torch.cat([sinks, middle, window], dim=-1)  # (B, T, k)
    index = torch.where(short.unsqueeze(-1), slots.expand(B, T, k), index)
    valid = (slots <= pos.unsqueeze(-1)) | ~short.unsqueeze(-1)
    return GatheredSelection(index, valid)


# Queries per row up to which the absorbed attention is written out (scores over the cache as
# batched products, no per-head copy of the shared key head: decode steps and verify windows);
# longer ones (prefill, context-parallel training) use the fused SDPA kernel, which never holds
# the (heads, queries, keys) scores in memory.
DECODE_QUERIES = 16


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, has_indexer: bool = False) -> None:
        super().__init__()
        c = config
        self.config = c
        self.n_heads = c.num_attention_heads
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora = c.kv_lora_rank
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.mla_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.mla_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=False)
        self.indexer = Indexer(c) if has_indexer else None
        # LoRA variance alignment: both query parts scale by sqrt(H/q_lora) (folded into the
        # softmax scale below, it is linear), the kv latent by sqrt(H/kv_lora).
        self.q_scale = (c.hidden_size / c.q_lora_rank) ** 0.5
        self.kv_scale = (c.hidden_size / c.kv_lora_rank) ** 0.5
        self.scale = c.softmax_scale * self.q_scale

    # ------------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, sublayer: int, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, T, H) -> (out (B, T, H), sparse selection for the sibling sublayer, indexer loss).

        `keep` is the selection computed by sublayer 0 of the same layer (reused by sublayer 1): a
        keep-mask (B, T, S), or over a cache the `GatheredSelection` it was turned into.
        """
        B, T, _ = x.shape
        q_latent = self.q_a_layernorm(linear(x, self.q_a_proj))  # (B, T, q_lora)
        q = linear(q_latent, self.q_b_proj).view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, ctx.cos, ctx.sin)
        c_kv, k_rope = linear(x, self.kv_a_proj_with_mqa).split([self.kv_lora, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv) * self.kv_scale  # (B, T, kv_lora)
        k_rope = apply_rope(k_rope, ctx.cos, ctx.sin)  # (B, T, rope)

        cache = ctx.cache
        if cache is not None:
            c_kv_all, k_rope_all = cache.write(sublayer, ctx.positions, c_kv, k_rope)  # (B, S, .)
        else:
            c_kv_all, k_rope_all = c_kv, k_rope
        S = c_kv_all.shape[1]

        def causal() -> torch.Tensor:
            # (B, T, S), built only where a path needs the mask: LSA over a cache never does
            return (ctx.positions.unsqueeze(-1) >= torch.arange(S, device=x.device)).expand(B, T, S)

        index_loss = None
        if self.indexer is not None:
            keep, index_loss = self._select(x, q_latent, ctx, sublayer // 2, causal, q_nope, q_rope, c_kv_all, k_rope_all)

        if cache is None:
            out = self._dense_path(q_nope, q_rope, c_kv, k_rope, keep)
        elif keep is not None:
            if not isinstance(keep, GatheredSelection):
                # a keep-mask (the indexer-training path) -> (B, T, k): the kept keys first, then padding
                chosen = keep.view(torch.uint8).topk(min(self.config.index_topk, keep.shape[-1]), dim=-1)
                keep = GatheredSelection(chosen.indices, chosen.values.bool())
            out = self._selected_path(q_nope, q_rope, c_kv_all, k_rope_all, keep)
        else:
            out = self._absorbed_path(q_nope, q_rope, c_kv_all, k_rope_all, causal())
        return linear(out.reshape(B, T, -1), self.o_proj), keep, index_loss

    # ------------------------------------------------------------------------------------------
    def _dense_path(self, q_nope, q_rope, c_kv, k_rope, keep):
        """Expand the latent to per-head K/V and attend with SDPA. Shapes (B, T, h, d)."""
        B, T, h, _ = q_nope.shape
        kv = linear(c_kv, self.kv_b_proj).view(B, T, h, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, h, T, qk)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, h, self.rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            # Fused SDPA kernels want equal q/k/v head sizes; zero columns cost less than the
            # unfused fallback and are sliced off again.
            v = F.pad(v, (0, pad))
        if keep is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.unsqueeze(1), scale=self.scale)
        return o[..., : self.v_dim].transpose(1, 2)  # (B, T, h, v)

    def absorbed_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk (h, nope, kv_lora), W_uv (h, v, kv_lora); an FP8-resident
        kv_b_proj is dequantized into `dtype` (default: the dtype of the module's norms)."""
        if is_fp8(self.kv_b_proj.weight):
            dtype = dtype or self.q_a_layernorm.weight.dtype
        w = dense_weight(self.kv_b_proj, dtype=dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora)
        return w[:, : self.nope], w[:, self.nope :]

    def _absorbed_path(self, q_nope, q_rope, c_kv_all, k_rope_all, mask):
        """Attend over the latent cache directly: one shared 'head' of size kv_lora + rope.

        q_nope (B, T, h, nope), q_rope (B, T, h, rope), c_kv_all (B, S, kv), k_rope_all (B, S, rope),
        mask (B, T, S) -> (B, T, h, v).
        """
        B, T, h, _ = q_nope.shape
        kv = self.kv_lora
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)  # (h, nope, kv), (h, v, kv)
        # W_uk folded into the query, per head: (h, B*T, nope) -> (h, B*T, kv)
        q_lat = linear(q_nope.permute(2, 0, 1, 3).reshape(h, B * T, self.nope), w_uk.transpose(1, 2).to(q_nope.dtype))
        if T > DECODE_QUERIES:
            q = torch.cat([q_lat.view(h, B, T, kv).transpose(0, 1), q_rope.transpose(1, 2)], dim=-1)  # (B, h, T, kv+rope)
            k = torch.cat([c_kv_all, k_rope_all], dim=-1).unsqueeze(1).to(q.dtype)  # (B, 1, S, kv+rope)
            v = c_kv_all.unsqueeze(1).to(q.dtype)  # (B, 1, S, kv)
            o_lat = F.scaled_dot_product_attention(
                q, k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1), attn_mask=mask.unsqueeze(1), scale=self.scale
            )  # (B, h, T, kv)
        else:
            S = c_kv_all.shape[1]
            q_lat = q_lat.view(h, B, T, kv).transpose(0, 1).reshape(B, h * T, kv)
            q_r = q_rope.permute(0, 2, 1, 3).reshape(B, h * T, self.rope)
            c_all = c_kv_all.to(q_lat.dtype)
            # the cached keys as the rows of a per-sequence weight: compiled for few queries, one
            # generated dot product per (query, key) along the contiguous latent
            scores = linear(q_lat, c_all) + linear(q_r, k_rope_all.to(q_r.dtype))  # (B, h*T, S)
            scores = scores.view(B, h, T, S).float() * self.scale  # (B, h, T, S)
            probs = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1).to(c_all.dtype)
            o_lat = torch.bmm(probs.view(B, h * T, S), c_all).view(B, h, T, kv)
        o_lat = o_lat.transpose(0, 1).reshape(h, B * T, kv)
        out = linear(o_lat, w_uv.to(o_lat.dtype))  # (h, B*T, v): W_uv applied per head
        return out.view(h, B, T, self.v_dim).permute(1, 2, 0, 3)

    def _selected_path(self, q_nope, q_rope, c_kv_all, k_rope_all, selection: GatheredSelection):
        """LSA over the latent cache: each query attends to its selected keys only, gathered from
        the cache, so the work per query does not grow with the context. -> (B, T, h, v)."""
        B, T, h, _ = q_nope.shape
        k = selection.index.shape[-1]
        valid = selection.valid  # (B, T, k)
        at = selection.index.reshape(B, T * k, 1)
        c_sel = c_kv_all.gather(1, at.expand(B, T * k, self.kv_lora)).view(B, T, k, self.kv_lora)
        r_sel = k_rope_all.gather(1, at.expand(B, T * k, self.rope)).view(B, T, k, self.rope)
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)  # (h, nope, kv), (h, v, kv)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk.to(q_nope.dtype))  # (B, T, h, kv)
        scores = torch.einsum("bthc,btkc->bthk", q_lat, c_sel.to(q_lat.dtype)) + torch.einsum(
            "bthr,btkr->bthk", q_rope, r_sel.to(q_rope.dtype)
        )  # (B, T, h, k)
        probs = (scores.float() * self.scale).masked_fill(~valid.unsqueeze(2), float("-inf")).softmax(-1)
        o_lat = torch.einsum("bthk,btkc->bthc", probs.to(c_sel.dtype), c_sel)  # (B, T, h, kv)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv.to(o_lat.dtype))  # (B, T, h, v)

    # ------------------------------------------------------------------------------------------
    def _select(self, x, q_latent, ctx, layer, causal, q_nope, q_rope, c_kv_all, k_rope_all):
        """Run the indexer; return (selection or None, indexer KL loss or None). The selection is a
        keep-mask (B, T, S) without a cache (and when training the indexer), else a
        `GatheredSelection`. `causal()` builds the (B, T, S) causal mask."""
        cfg = self.config
        train_indexer = ctx.indexer_loss and torch.is_grad_enabled()
        # The indexer learns from its own loss only: its inputs are cut from the main graph.
        xi, qi = (x.detach(), q_latent.detach()) if train_indexer else (x, q_latent)
        keys = self.indexer.keys(xi, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            keys = ctx.cache.write_index(layer, ctx.positions, keys)
        S = keys.shape[1]
        if train_indexer:
            need_scores = True
        elif not ctx.sparse or S <= cfg.index_topk:
            # no selection, or no query can see more than index_topk keys: exactly dense. Decided
            # from a size where it can be, so a compiled decode step has no data-dependent branch.
            need_scores = False
        else:
            # the most keys a query sees: causal keys are those at or before its position
            need_scores = min(int(ctx.positions.max()) + 1, S) > cfg.index_topk
        if not need_scores:
            return None, None
        if ctx.cache is not None and not train_indexer:
            # Over a cache: positions from block maxima and recomputed candidates (a chunk never
            # writes its (B, T, S) scores) or, for a decode step, from its scores; no (B, T, S)
            # mask. The selection is discrete, so no graph is kept. Buffers come from the cache's
            # reusable workspace: fresh context-sized tensors would be page-faulted in at every step
            # and chunk (the buffers keep the largest one until the cache is freed).
            workspace = getattr(ctx.cache, "workspace", None)
            return self.indexer.select(xi, qi, keys, ctx.cos, ctx.sin, ctx.positions, cfg, workspace=workspace), None
        mask = causal()
        scores = self.indexer.scores(xi, qi, keys, ctx.cos, ctx.sin)  # (B, T, S)
        keep = select_tokens(scores.detach(), mask, cfg) if ctx.sparse else None
        loss = None
        if train_indexer:
            loss = self._indexer_kl(scores, mask if keep is None else keep, q_nope, q_rope, c_kv_all, k_rope_all)
        return keep, loss

    @torch.no_grad()
    def _attention_target(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Main attention probabilities summed over heads and renormalised: (B, T, S)."""
        with torch.autocast(q_nope.device.type, enabled=False):  # fp32: a KL target must sum to 1
            return self._attention_target_fp32(q_nope, q_rope, c_kv, k_rope, mask)

    def _attention_target_fp32(self, q_nope, q_rope, c_kv, k_rope, mask):
        w_uk, _ = self.absorbed_weights()
        q_lat = torch.einsum("bthd,hdc->bhtc", q_nope.float(), w_uk.float())
        logits = (q_lat @ c_kv.float().transpose(1, 2).unsqueeze(1)) + (
            q_rope.float().transpose(1, 2) @ k_rope.float().transpose(1, 2).unsqueeze(1)
        )
        probs = (logits * self.scale).masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1)
        target = probs.sum(1)
        return target / target.sum(-1, keepdim=True)

    def _indexer_kl(self, scores, mask, q_nope, q_rope, c_kv, k_rope):
        target = self._attention_target(q_nope, q_rope, c_kv, k_rope, mask)
        log_q = scores.float().masked_fill(~mask, float("-inf")).log_softmax(-1)
        kl = torch.where(mask, target * (target.clamp_min(1e-20).log() - log_q), torch.zeros_like(log_q))
        return kl.sum(-1).mean()
