"""LSA at length: the selection equals a stable sort's (as a mask, and as cache positions through
the block pre-selection), attention over the gathered selected latents equals masked attention
over the whole cache, and decoding over the cache equals the full forward while the selection
runs on blocks."""

from __future__ import annotations

import pytest
import torch

import longcat.model.attention as attention
from longcat.config import preset
from longcat.model import LatentCache, build_model, select_tokens
from longcat.model.attention import GatheredSelection, select_positions


def _stable_sort_selection(scores, causal, cfg):
    S = scores.shape[-1]
    key_pos = torch.arange(S)
    query_pos = causal.long().cumsum(-1)[..., -1:] - 1
    forced = (key_pos < cfg.index_init_tokens) | (key_pos > query_pos - cfg.index_local_tokens)
    choice = scores.float().masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    top = choice.sort(dim=-1, descending=True, stable=True).indices[..., : cfg.index_topk]
    return torch.zeros_like(causal).scatter_(-1, top, True) & causal


def test_selection_matches_a_stable_sort_with_many_ties():
    cfg = preset("tiny")
    g = torch.Generator().manual_seed(0)
    B, T, S = 2, 50, 200
    # few distinct values: ties at the k-th score in most rows (relu zeros do this in practice)
    scores = torch.randint(-2, 3, (B, T, S), generator=g).float().clamp_min(0)
    positions = torch.arange(S - T, S).view(1, T, 1)
    causal = (positions >= torch.arange(S)).expand(B, T, S)
    keep = select_tokens(scores, causal, cfg)
    assert torch.equal(keep, _stable_sort_selection(scores, causal, cfg))
    assert (keep.sum(-1) == cfg.index_topk).all()


def test_gathered_attention_equals_masked_attention():
    cfg = preset("tiny")
    model = build_model(cfg, seed=1).eval()
    mla = model.layers[0].self_attn[0]
    g = torch.Generator().manual_seed(2)
    B, T, S, h = 2, 3, 120, cfg.num_attention_heads
    q_nope = torch.randn(B, T, h, cfg.qk_nope_head_dim, generator=g)
    q_rope = torch.randn(B, T, h, cfg.qk_rope_head_dim, generator=g)
    c_kv = torch.randn(B, S, cfg.kv_lora_rank, generator=g)
    k_rope = torch.randn(B, S, cfg.qk_rope_head_dim, generator=g)
    keep = torch.zeros(B, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            keep[b, t, torch.randperm(S, generator=g)[: cfg.index_topk - t]] = True  # some rows below k
    chosen = keep.view(torch.uint8).topk(cfg.index_topk, dim=-1)
    selection = GatheredSelection(chosen.indices, chosen.values.bool())
    with torch.no_grad():
        gathered = mla._selected_path(q_nope, q_rope, c_kv, k_rope, selection)
        masked = mla._absorbed_path(q_nope, q_rope, c_kv, k_rope, keep)
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=1e-4)


def _as_mask(selection: GatheredSelection, S: int) -> torch.Tensor:
    """(B, T, k) positions -> (B, T, S) keep-mask; each valid position must be kept once."""
    B, T, _ = selection.index.shape
    mask = torch.zeros(B, T, S + 1, dtype=torch.bool)  # column S takes the invalid slots
    mask.scatter_(-1, torch.where(selection.valid, selection.index, S), True)
    assert torch.equal(mask[..., :S].sum(-1), selection.valid.sum(-1)), "a position was selected twice"
    return mask[..., :S]


@pytest.mark.parametrize("block", [1, 4, 128])
def test_selected_positions_equal_the_stable_sort_selection(block):
    """Rows at different positions (some short enough to keep everything), decode-shaped and
    chunk-shaped, scores with many ties (relu zeros, few distinct values): the positions equal
    `select_tokens`' mask, block pre-selection or not (128 keys per block: the whole row)."""
    cfg = preset("tiny", index_topk=20, index_init_tokens=2, index_local_tokens=5)  # 13 chosen by score
    g = torch.Generator().manual_seed(block)
    for trial in range(40):
        B, T = (3, 1) if trial % 2 else (2, 6)
        S = int(torch.randint(30, 600, (1,), generator=g))
        if trial % 4 == 0:
            scores = torch.randint(-2, 3, (B, T, S), generator=g).float().clamp_min(0)
        elif trial % 4 == 1:
            scores = -(torch.rand(B, T, S, generator=g) < 0.3).float()  # the best score 0, tied everywhere
        elif trial % 4 == 2:
            # one value everywhere, a few higher ones late: blocks tied at the threshold come first
            scores = torch.ones(B, T, S)
            scores[..., S // 2 + torch.randperm(S // 2, generator=g)[:5]] = 2.0
        else:
            scores = torch.randn(B, T, S, generator=g)
        positions = torch.randint(0, S, (B, T), generator=g)
        positions[0, -1] = S - 1
        causal = positions.unsqueeze(-1) >= torch.arange(S)
        expected = select_tokens(scores.clone(), causal, cfg)
        expected = causal if expected is None else expected
        chosen = select_positions(scores.clone(), positions, cfg, block=block)
        assert chosen.index.shape == (B, T, cfg.index_topk)
        assert torch.equal(_as_mask(chosen, S), expected), (trial, S)


def test_decode_equals_full_forward_with_block_preselection(monkeypatch):
    """The cached path (chunked prefill, then decode steps with one row 40 positions behind the
    other, so its query must ignore later keys of its row) equals the full forward with the masked
    selection, with blocks small enough that the pre-selection decides which keys are candidates."""
    monkeypatch.setattr(attention, "SELECTION_BLOCK", 2)  # 23 candidate blocks of 2 < the ~100 keys
    cfg = preset("tiny")
    model = build_model(cfg, seed=0).eval()
    B, T, prefill, chunk, behind = 2, 120, 96, 32, 40
    x = torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    P = cfg.oe_neighbor_num - 1
    with torch.no_grad():
        full = model(x).logits  # (B, T, V): no cache, select_tokens' mask on SDPA
        cache = LatentCache(cfg, B, T)
        prefilled = [
            model(x[:, c:c + chunk], positions=torch.arange(c, c + chunk).unsqueeze(0), cache=cache,
                  ngram_history=x[:, c - P:c] if c else None).logits
            for c in range(0, prefill, chunk)
        ]
        torch.testing.assert_close(torch.cat(prefilled, dim=1), full[:, :prefill], atol=1e-5, rtol=0)
        for p in range(prefill, T):
            q = p - behind  # row 1 re-decodes a prefilled position: the same key is written again
            positions = torch.tensor([[p], [q]])
            ids = torch.stack([x[0, p], x[1, q]]).view(B, 1)
            history = torch.stack([x[0, p - P:p], x[1, q - P:q]])
            cache.begin(positions)
            logits, _ = model.decode(ids, positions, cache, history)
            torch.testing.assert_close(logits[0, -1], full[0, p], atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[1, -1], full[1, q], atol=1e-5, rtol=0)


def test_decode_steps_reuse_the_cache_workspace():
    """Sparse decode steps score into the cache's scratch buffers (no per-step allocation of the
    context's size), shared by narrowed views; the indexer keys are stored feature-major."""
    cfg = preset("tiny")
    model = build_model(cfg, seed=0).eval()
    cache = LatentCache(cfg, 2, 256)
    index_store = cache.storage()[2]
    assert index_store.shape[1:] == (256, cfg.index_head_dim) and index_store.stride(1) == 1
    x = torch.randint(3, cfg.vocab_size, (1, 201), generator=torch.Generator().manual_seed(0))
    P = cfg.oe_neighbor_num - 1
    view = cache.narrow(1)
    with torch.no_grad():
        model(x[:, :200], cache=view)
        pointers = []
        for p in (200, 200):
            positions = torch.tensor([[p]])
            view.begin(positions)
            model.decode(x[:, p:p + 1], positions, view, x[:, p - P:p])
            pointers.append({name: buf.data_ptr() for name, buf in cache._workspace.items()})
    assert set(pointers[0]) == {"index_logits", "index_scores"} and pointers[0] == pointers[1]
    assert cache.workspace("index_scores", (1, 1, 8), torch.float32).data_ptr() == pointers[0]["index_scores"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_scores_by_tile_equal_the_whole_product(monkeypatch, dtype):
    """Without autograd the scores run tile by tile over the cached keys (7 keys a tile here, the
    last one partial; a bf16 cache widened per tile), into the cache's workspace: the same scores
    as the whole, differentiable product over the widened keys."""
    monkeypatch.setattr(attention, "SCORE_TILE_BYTES", 0)
    monkeypatch.setattr(attention, "MIN_TILE_KEYS", 7)
    cfg = preset("tiny")
    model = build_model(cfg, seed=0).eval()
    mla = model.layers[0].self_attn[0]
    B, T, S = 2, 3, 50
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, cfg.hidden_size, generator=g)
    cache = LatentCache(cfg, B, 64, dtype=dtype)
    positions = torch.arange(S - T, S).unsqueeze(0)
    cos, sin = model.rotary(positions, torch.float32)
    with torch.no_grad():
        cache.begin(torch.tensor([[S - 1]]))
        cache.write_index(0, torch.arange(S).unsqueeze(0), torch.randn(B, S, cfg.index_head_dim, generator=g))
        keys = cache.write_index(0, positions, mla.indexer.keys(x, cos, sin))  # (B, S, d) in the cache's dtype
        q_latent = mla.q_a_layernorm(mla.q_a_proj(x))
        by_tile = mla.indexer.scores(x, q_latent, keys, cos, sin, workspace=cache.workspace)
    whole = mla.indexer.scores(x, q_latent, keys.float(), cos, sin)  # grad enabled: the untiled path
    assert keys.dtype == dtype and by_tile.shape == (B, T, S)
    torch.testing.assert_close(by_tile, whole.detach(), atol=1e-6, rtol=1e-6)
