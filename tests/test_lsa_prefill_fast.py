"""LSA's selection for a prefill chunk over a cache without the chunk's (B, T, S) scores
(`Indexer.select`: block maxima tile by tile, then the candidate blocks' scores recomputed from their
keys) picks exactly the positions `select_positions` picks from the whole scores, ties included, and
a chunked prefill through it equals the full forward."""

from __future__ import annotations

import pytest
import torch

import longcat.model.attention as attention
from longcat.config import preset
from longcat.model import LatentCache, build_model
from longcat.model.attention import select_positions


def _integer_indexer(cfg, seed):
    """An indexer whose logits are small integers (identity rope below): relu zeros and exact ties
    everywhere, and head weights of both signs (a row with only negative weights scores 0 at best)."""
    model = build_model(cfg, seed=seed).eval()
    indexer = model.layers[0].self_attn[0].indexer
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        indexer.wq_b.weight.copy_(torch.randint(-1, 2, indexer.wq_b.weight.shape, generator=g).float())
        indexer.weights_proj.weight.copy_(torch.randint(-2, 3, indexer.weights_proj.weight.shape, generator=g).float())
    return indexer


@pytest.mark.parametrize("block,tile_keys,S,dtype", [
    (4, 8, 203, torch.float32),    # several tiles, a partial last tile and a partial last block
    (8, 24, 400, torch.float32),   # tiles of three blocks, S a whole number of blocks
    (4, 8, 150, torch.bfloat16),   # a bf16 cache, its keys widened per tile and per candidate
    (16, 32, 410, torch.float32),  # the partial last block holds middle keys of the last queries
])
def test_select_equals_select_positions_on_the_whole_scores(monkeypatch, block, tile_keys, S, dtype):
    monkeypatch.setattr(attention, "SELECTION_BLOCK", block)
    monkeypatch.setattr(attention, "SCORE_TILE_BYTES", 0)
    monkeypatch.setattr(attention, "BLOCK_TILE_BYTES", 0)
    monkeypatch.setattr(attention, "MIN_KEYS_PER_CANDIDATE", 1)  # the block path at these tiny sizes
    monkeypatch.setattr(attention, "MIN_TILE_KEYS", tile_keys)
    cfg = preset("tiny")
    d, init, local = cfg.index_head_dim, cfg.index_init_tokens, cfg.index_local_tokens
    block_maxima_calls = []
    original = attention.Indexer._block_maxima
    monkeypatch.setattr(attention.Indexer, "_block_maxima",
                        lambda self, *a: block_maxima_calls.append(1) or original(self, *a))
    for trial in range(6):
        indexer = _integer_indexer(cfg, seed=trial)
        g = torch.Generator().manual_seed(100 + trial)
        B, T = (2, 7) if trial % 2 else (1, 16)
        cache = LatentCache(cfg, B, S + 8, dtype=dtype)
        # integer keys (ties everywhere) on most trials, continuous ones (distinct scores) on the rest
        values = (torch.randint(-1, 2, (B, S, d), generator=g).float() if trial % 3
                  else torch.randn(B, S, d, generator=g))
        values[:, -12:] *= 4  # the latest keys score highest (or lowest): a partial last block matters
        cache.begin(torch.tensor([[S - 1]]))  # the forward spans keys 0..S-1 of the longer cache
        keys = cache.write_index(0, torch.arange(S).unsqueeze(0), values)
        assert keys.shape == (B, S, d)
        x = torch.randn(B, T, cfg.hidden_size, generator=g)
        q_latent = torch.randint(-1, 2, (B, T, cfg.q_lora_rank), generator=g).float()
        cos, sin = torch.ones(1, T, cfg.qk_rope_head_dim // 2), torch.zeros(1, T, cfg.qk_rope_head_dim // 2)
        # rows at different positions; the second row's chunk lies well inside its keys, and on
        # odd trials one of its queries sees fewer than index_topk keys (it keeps them all)
        positions = torch.arange(S - T, S).repeat(B, 1)
        if B > 1:
            positions[1] = torch.arange(S // 2, S // 2 + T)
            positions[1, 0] = cfg.index_topk - 3
        with torch.no_grad():
            expected = select_positions(indexer.scores(x, q_latent, keys, cos, sin), positions, cfg, block=block)
            workspace = {}

            def scratch(name, shape, dt):
                workspace[name] = torch.empty(shape, dtype=dt).flatten()
                return workspace[name].view(shape)

            chosen = indexer.select(x, q_latent, keys, cos, sin, positions, cfg, workspace=scratch)
        assert "index_scores" not in workspace, "the chunk wrote its whole scores"
        assert torch.equal(chosen.valid, expected.valid), trial
        # the sinks, the chosen middle keys, the window, in that order, as select_positions gives them
        assert torch.equal(torch.where(chosen.valid, chosen.index, -1),
                           torch.where(expected.valid, expected.index, -1)), trial
        # rows that select (not the short one): middle keys lie between the sinks and the window
        middle = chosen.index[..., init:cfg.index_topk - local][positions >= cfg.index_topk]  # (rows, m)
        assert bool(((middle >= init) & (middle <= positions[positions >= cfg.index_topk].unsqueeze(-1) - local)).all())
    assert len(block_maxima_calls) == 6, "the block path did not run"


def test_chunked_prefill_through_block_maxima_equals_the_full_forward(monkeypatch):
    """Chunks of 24 over blocks of 4 keys and tiles of 8 (the last block of most chunks partial):
    the logits equal the full forward, whose selection is `select_tokens`' mask on whole scores."""
    monkeypatch.setattr(attention, "SELECTION_BLOCK", 4)
    monkeypatch.setattr(attention, "BLOCK_TILE_BYTES", 0)
    monkeypatch.setattr(attention, "MIN_KEYS_PER_CANDIDATE", 1)  # the block path at these tiny sizes
    monkeypatch.setattr(attention, "MIN_TILE_KEYS", 8)
    calls = []
    original = attention.Indexer._block_maxima
    monkeypatch.setattr(attention.Indexer, "_block_maxima", lambda self, *a: calls.append(1) or original(self, *a))
    cfg = preset("tiny")
    model = build_model(cfg, seed=0).eval()
    B, T, chunk = 2, 168, 24
    x = torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    P = cfg.oe_neighbor_num - 1
    with torch.no_grad():
        full = model(x).logits
        cache = LatentCache(cfg, B, T)
        chunks = [
            model(x[:, c:c + chunk], positions=torch.arange(c, c + chunk).unsqueeze(0), cache=cache,
                  ngram_history=x[:, c - P:c] if c else None).logits
            for c in range(0, T, chunk)
        ]
    assert calls, "no chunk took the block-maxima selection"
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
