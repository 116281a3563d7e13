"""LSA at length: the selection equals a stable sort's, and attention over the gathered selected
latents equals masked attention over the whole cache."""

from __future__ import annotations

import torch

from longcat.config import preset
from longcat.model import select_tokens
from longcat.model.attention import GatheredSelection


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
    from longcat.model import build_model

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
