"""N-gram embedding (LongCat-Flash-Lite, LongCat-2.0), DESIGN §2.4.

B = K * (n_max - 1) branches, one per (order n in 2..n_max, hash table j in 0..K-1). Branch b owns
a table of M + 2b + 1 rows (a distinct modulus m_b per branch) of width H/B and a projection back
to H. Its row at position t hashes the last n tokens:

    row_b(t) = sum_{j<n} x[t-j] * (V^j mod m_b)   (mod m_b)

Positions before the sequence start contribute nothing, and the look-back stops at an
end-of-document token so packed documents never mix. The output is
(E[x_t] + sum_b proj_b(T_b[row_b(t)])) / (1 + B).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


def branch_orders(config: ModelConfig) -> list[int]:
    """n-gram order of each branch: K branches of order 2, then K of order 3, ..."""
    return [2 + b // config.oe_split_num for b in range(config.ngram_branches)]


def branch_moduli(config: ModelConfig) -> list[int]:
    m = config.ngram_base_modulus
    return [m + 2 * b + 1 for b in range(config.ngram_branches)]


def ngram_rows(
    tokens: torch.Tensor, config: ModelConfig, history: torch.Tensor | None = None
) -> torch.Tensor:
    """Hash rows for every branch.

    tokens (B, T) int64; history (B, n_max-1) the tokens just before `tokens` (oldest first), -1
    where there is none (sequence start). Returns rows (branches, B, T) int64.
    """
    n_max, V, eos = config.oe_neighbor_num, config.vocab_size, config.eos_token_id
    B, T = tokens.shape
    if history is None:
        history = tokens.new_full((B, n_max - 1), -1)
    full = torch.cat([history.to(tokens.dtype), tokens], dim=1)  # (B, P+T)
    P = n_max - 1
    # shifted[j][:, t] = x[t-j] and whether it still belongs to x[t]'s document
    shifted, valid = [tokens], [torch.ones_like(tokens, dtype=torch.bool)]
    for j in range(1, n_max):
        prev = full[:, P - j : P - j + T]
        ok = valid[-1] & (prev >= 0) & (prev != eos)
        shifted.append(prev.clamp_min(0))
        valid.append(ok)
    rows = []
    for order, modulus in zip(branch_orders(config), branch_moduli(config)):
        acc = torch.zeros_like(tokens)
        for j in range(order):
            coeff = pow(V, j, modulus)
            acc = acc + torch.where(valid[j], shifted[j] * coeff, 0)
        rows.append(acc % modulus)
    return torch.stack(rows)


class NgramEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.branches = config.ngram_branches
        self.width = config.hidden_size // self.branches
        self.tables = nn.ModuleList(nn.Embedding(m, self.width) for m in branch_moduli(config))
        # The B projections (width -> H) fused into one GEMM over the concatenated lookups:
        # proj.weight[:, b*width:(b+1)*width] is branch b's projection.
        self.proj = nn.Linear(self.branches * self.width, config.hidden_size, bias=False)
        self.scale = 1.0 / (1 + self.branches)

    def forward(
        self, word: torch.Tensor, tokens: torch.Tensor, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """word: the word embedding E[x] (B, T, H); tokens (B, T) -> embedding (B, T, H)."""
        rows = ngram_rows(tokens, self.config, history)
        looked_up = torch.cat([table(rows[b]) for b, table in enumerate(self.tables)], dim=-1)
        grams = self.proj(looked_up.to(self.proj.weight.dtype))
        if self.config.oe_scale_word_embedding:
            return (word + grams) * self.scale
        return word + grams * self.scale
