"""Context-parallel prefill for inference: one long prompt split over the ranks of a group.

Rank r takes the r-th contiguous slice of the prompt and runs it through the model in one forward
over a latent cache whose `write` all-gathers every rank's slice first (the pattern of
`ContextParallelKV` for training, without autograd): layer by layer each rank sees the keys of
the whole prompt, its queries are masked to their true positions, so every query attends to
exactly what it would in one process, and every rank ends with the whole prompt's cache (the same
cache one process writes). The last rank's last position gives the next-token logits, broadcast
to all. Each rank's attention work and working set scale with its slice, not the prompt.

    logits = prefill_context_parallel(model, prompt_ids, cache, group=None)  # (1, V) on every rank

One sequence per call (batch 1). The MTP sublayers' cache rows are not written (as in the
engine's chunked prefill, which runs the main model only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatheringCache:
    """A LatentCache stand-in: writes the keys of all ranks' slices, reads positions 0..span-1."""

    def __init__(self, cache, group, world: int, slice_len: int, total: int) -> None:
        self.cache, self.group, self.world = cache, group, world
        self.slice_len, self.total = slice_len, total
        self.config = cache.config

    def begin(self, positions: torch.Tensor) -> None:
        self.cache.begin(positions)

    @property
    def span(self):
        return self.cache.span

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """(1, slice_len, d) on every rank -> (1, total, d): the whole prompt in order."""
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        return out.view(1, self.world * self.slice_len, x.shape[-1])[:, : self.total]

    def _all_positions(self, device) -> torch.Tensor:
        return torch.arange(self.total, device=device).unsqueeze(0)

    def write(self, sublayer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor):
        c_all, r_all = self._gather(c_kv), self._gather(k_rope)
        return self.cache.write(sublayer, self._all_positions(c_kv.device), c_all, r_all)

    def write_index(self, layer: int, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self.cache.write_index(layer, self._all_positions(keys.device), self._gather(keys))


@torch.inference_mode()
def prefill_context_parallel(model, prompt: list[int] | torch.Tensor, cache, *, group=None) -> torch.Tensor:
    """Prefill `prompt` (N token ids, the same on every rank) into `cache` (a one-row LatentCache
    of at least N positions) over the ranks of `group`; returns the logits (1, V) after the last
    prompt token, on every rank."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=cache.c_kv.device).view(-1)
    N = tokens.numel()
    if N < world:
        raise ValueError(f"a prompt of {N} tokens cannot be split over {world} ranks; use fewer ranks")
    if cache.max_len < N:
        raise ValueError(f"the cache holds {cache.max_len} positions, the prompt has {N}")
    slice_len = -(-N // world)
    start = min(rank * slice_len, N)
    end = min(start + slice_len, N)
    # every rank runs slice_len positions (the all-gather needs equal shapes); a short last slice
    # repeats its final position: its keys are computed twice and written once
    positions = torch.arange(start, start + slice_len, device=tokens.device).clamp_max(N - 1)
    if end <= start:  # more ranks than full slices: this rank only mirrors the last token
        positions = torch.full((slice_len,), N - 1, device=tokens.device)
    ids = tokens[positions].unsqueeze(0)  # (1, slice_len)
    config = model.config
    history = None
    if config.ngram_enabled:
        width = config.oe_neighbor_num - 1
        before = int(positions[0]) - width + torch.arange(width, device=tokens.device)
        history = tokens[before.clamp_min(0)].masked_fill(before < 0, -1).unsqueeze(0)  # (1, width)
    view = _GatheringCache(cache, group, world, slice_len, N)
    out = model(ids, positions=positions.unsqueeze(0), cache=view, ngram_history=history, mtp=False,
                indexer_loss=False, logits_to_keep=1)
    # the prompt's last position on the last rank (a repeated position after it saw itself as its
    # own predecessor in the n-gram hash)
    last = max(0, min(N - 1 - start, slice_len - 1))
    logits = model.head(out.hidden_states[:, last]).float().contiguous()  # (1, V)
    dist.broadcast(logits, src=dist.get_global_rank(group, world - 1) if group is not None else world - 1,
                   group=group)
    cache.lengths[0] = N
    return logits


__all__ = ["prefill_context_parallel"]
