"""The per-row state of sequences that decode together.

Row i holds one sequence: its tokens so far (prompt, committed tokens, and during a speculative
step the drafts after them) in a preallocated (B, L) buffer, and `n[i]`, the position of its
newest committed token, which the next forward feeds to the model. The latent cache holds every
position before n[i]. Rows decode at their own positions, so sequences of different lengths run
together. Slots past a row's end may hold garbage (padding, rejected drafts): they are always
rewritten before any query attends to them, because a forward writes its tokens' keys first and
a query only sees positions up to its own.

Finished rows are removed by moving the last live rows into their slots, so a batch never
computes for sequences that are done and no buffer is ever reallocated.
"""

from __future__ import annotations

import torch

from ..model import LatentCache


def token_history(tokens: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` tokens before position start[i] of each row, oldest first; -1 before the start.

    This is the n-gram embedding's per-sequence state (`ngram_history` of the model).
    tokens (B, L), start (B,) -> (B, width).
    """
    index = start.unsqueeze(1) - width + torch.arange(width, device=tokens.device)
    return tokens.gather(1, index.clamp_min(0)).masked_fill(index < 0, -1)


class DecodeBatch:
    """tokens (B, L) long, n (B,) long, and a latent cache view of B rows."""

    def __init__(self, cache: LatentCache, tokens: torch.Tensor, n: torch.Tensor) -> None:
        self.cache = cache
        self.tokens = tokens
        self.n = n
        self.extra: list = []  # objects with move_rows(src, dst) / narrow(size): drafter, sampler

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def keep(self, alive: list[bool]) -> tuple[list[int], list[int]]:
        """Drop the rows that are not alive: the last live rows move into the holes.

        Returns (src, dst): row src[j] now lives at dst[j]; rows keep their order otherwise.
        """
        m = sum(alive)
        holes = [i for i in range(m) if not alive[i]]
        movers = [i for i in range(m, len(alive)) if alive[i]]
        src, dst = movers, holes
        if src:
            s = torch.tensor(src, device=self.tokens.device)
            d = torch.tensor(dst, device=self.tokens.device)
            self.cache.copy_rows(s, d)
            self.tokens[d] = self.tokens[s]
            self.n[d] = self.n[s]
            for obj in self.extra:
                obj.move_rows(src, dst)
        if m < len(alive) and m > 0:
            self.cache = self.cache.narrow(m)
            self.tokens = self.tokens[:m]
            self.n = self.n[:m]
            for obj in self.extra:
                obj.narrow(m)
        return src, dst


__all__ = ["DecodeBatch", "token_history"]
