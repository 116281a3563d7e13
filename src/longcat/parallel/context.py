"""Context parallelism: each cp rank holds 2 of the 2*cp sequence chunks (zig-zag), all-gathers KV.

Zig-zag: with the sequence cut into 2*cp equal chunks, rank r holds chunks r and 2*cp-1-r, so
every rank gets the same amount of causal attention work (an early chunk and a late one).

MLA makes the exchange small: what every query needs from other ranks is the latent
`[c_kv, k_rope]` (kv_lora + rope values per token), not per-head keys and values. The model
already has an entry point for "attend over keys that were computed elsewhere": the latent
cache. `ContextParallelKV` plays the cache: its `write` all-gathers the latent of the local
tokens from every cp rank (backward: reduce-scatter of the key gradients) and returns it in
global order, and the model masks with the true global positions. No model change is needed.

The n-gram embedding looks back n-1 tokens across chunk boundaries, so `ContextParallelNgram`
gathers the (tiny, integer) token ids of the whole sequence and hashes with the full context.

Not supported under cp > 1: the MTP heads (they shift the sequence by d tokens across shards).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..model.ngram import NgramEmbedding, ngram_rows


def zigzag_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions (2*c,) held by cp rank `rank`: chunk r then chunk 2*cp-1-r."""
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len {seq_len} must be divisible by 2*cp = {2 * cp}")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


class _GatherSeq(torch.autograd.Function):
    """All-gather (B, t, d) along a new leading rank dim: (cp, B, t, d). Backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group, world: int):  # noqa: D102
        ctx.group, ctx.world = group, world
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # gloo wants the ranks concatenated on dim 0
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        # Every rank's queries attended to these keys: sum their gradients, keep our slice.
        grad = grad.contiguous()
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(out, grad.flatten(0, 1), group=ctx.group)
        return out, None, None


class ContextParallelKV:
    """A stand-in for LatentCache during context-parallel training (one per forward).

    `write` returns the whole sequence's latent (B, S, .) in global order, with autograd.
    """

    def __init__(self, cp_mesh: DeviceMesh, seq_len: int) -> None:
        self.group = cp_mesh.get_group()
        self.cp = cp_mesh.size()
        self.seq_len = seq_len
        order = torch.cat([zigzag_index(seq_len, self.cp, r) for r in range(self.cp)])
        self.gathered_to_global = torch.argsort(order)  # (S,) gathered position -> global order

    def positions(self, rank: int) -> torch.Tensor:
        return zigzag_index(self.seq_len, self.cp, rank).unsqueeze(0)  # (1, 2c)

    def begin(self, positions: torch.Tensor) -> None:
        if positions.shape[-1] * self.cp != self.seq_len:
            raise ValueError(
                f"context-parallel forward got {positions.shape[-1]} local tokens; expected seq_len/cp = "
                f"{self.seq_len // self.cp}"
            )

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        g = _GatherSeq.apply(x, self.group, self.cp)  # (cp, B, 2c, d)
        B, d = x.shape[0], x.shape[-1]
        g = g.permute(1, 0, 2, 3).reshape(B, self.seq_len, d)
        return g[:, self.gathered_to_global.to(x.device)]

    def write(self, sublayer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor):
        return self._gather(c_kv), self._gather(k_rope)

    def write_index(self, layer: int, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._gather(keys)


class ContextParallelNgram(NgramEmbedding):
    """NgramEmbedding over a zig-zag shard: hashes each local token with its true predecessors.

    Set `cp_group`, `cp` and `local_index` (the global positions of the local tokens) before the
    forward (`apply_context_parallel` and the training step do).
    """

    cp_group = None
    cp: int = 1
    seq_len: int = 0

    def forward(self, word, tokens, history=None):  # noqa: D102
        B, t = tokens.shape
        gathered = tokens.new_empty((self.cp * B, t))
        dist.all_gather_into_tensor(gathered, tokens.contiguous(), group=self.cp_group)
        gathered = gathered.view(self.cp, B, t)
        order = torch.cat([zigzag_index(self.seq_len, self.cp, r, tokens.device) for r in range(self.cp)])
        full = torch.empty((B, self.seq_len), dtype=tokens.dtype, device=tokens.device)
        full[:, order] = gathered.permute(1, 0, 2).reshape(B, self.seq_len)
        rank = dist.get_rank(self.cp_group)
        local = zigzag_index(self.seq_len, self.cp, rank, tokens.device)
        rows = ngram_rows(full, self.config, history)[:, :, local]  # (branches, B, t)
        looked_up = torch.cat([table(rows[b]) for b, table in enumerate(self.tables)], dim=-1)
        grams = self.proj(looked_up.to(self.proj.weight.dtype))
        if self.config.oe_scale_word_embedding:
            return (word + grams) * self.scale
        return word + grams * self.scale


def apply_context_parallel(model: torch.nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> ContextParallelKV:
    """Prepare `model` for zig-zag context parallelism; returns the KV exchange to pass as `cache`."""
    ngram = getattr(model, "ngram", None)
    if ngram is not None:
        ngram.__class__ = ContextParallelNgram
        ngram.cp_group = cp_mesh.get_group()
        ngram.cp = cp_mesh.size()
        ngram.seq_len = seq_len
    return ContextParallelKV(cp_mesh, seq_len)


__all__ = ["zigzag_index", "ContextParallelKV", "ContextParallelNgram", "apply_context_parallel"]
