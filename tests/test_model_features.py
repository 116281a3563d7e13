"""What transformers' LongcatFlash does not have, tested against hand computations and naive loops:
n-gram embedding, LongCat sparse attention, MTP heads, identity experts, grouped-GEMM experts,
the latent-cache (absorbed) decode path and router statistics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcat.config import preset
from longcat.model import (
    AttentionContext,
    GroupedExperts,
    LatentCache,
    MoE,
    NgramEmbedding,
    build_model,
    count_parameters,
    lm_losses,
    ngram_rows,
    select_tokens,
)
from longcat.model.layers import apply_rope

# ---------------------------------------------------------------------------------------------------
# 1. n-gram embedding

# V = 10, M = int(0.65 * 10) = 6, n_max = 3, K = 2 -> B = 4 branches, orders [2, 2, 3, 3],
# moduli m_b = M + 2b + 1 = [7, 9, 11, 13], coefficients V^j mod m_b:
#   b0 (n=2, m=7):  [1, 10%7=3]
#   b1 (n=2, m=9):  [1, 10%9=1]
#   b2 (n=3, m=11): [1, 10%11=10, 100%11=1]
#   b3 (n=3, m=13): [1, 10%13=10, 100%13=9]
EOS = 7
NGRAM_CFG = dict(
    vocab_size=10, hidden_size=8, oe_vocab_size_ratio=0.65, oe_neighbor_num=3, oe_split_num=2,
    eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
)
TOKENS = [3, 5, EOS, 4, 6, 8]
# Look-back per position (x[t-j] is used only if none of x[t-j..t-1] is EOS and t-j >= 0):
#   t0: x=3            (nothing before the start)
#   t1: x=5, 3
#   t2: x=7, 5, 3      (the EOS itself is the j=0 token of its own n-gram)
#   t3: x=4            (x2 = EOS: the new document starts here)
#   t4: x=6, 4         (x2 = EOS stops the order-3 look-back)
#   t5: x=8, 6, 4
EXPECTED_ROWS = [
    # b0: 3;  5+3*3=14%7=0;  7+5*3=22%7=1;  4;  6+4*3=18%7=4;  8+6*3=26%7=5
    [3, 0, 1, 4, 4, 5],
    # b1: 3;  5+3=8;  7+5=12%9=3;  4;  6+4=10%9=1;  8+6=14%9=5
    [3, 8, 3, 4, 1, 5],
    # b2: 3;  5+30=35%11=2;  7+50+3=60%11=5;  4;  6+40=46%11=2;  8+60+4=72%11=6
    [3, 2, 5, 4, 2, 6],
    # b3: 3;  5+30=35%13=9;  7+50+27=84%13=6;  4;  6+40=46%13=7;  8+60+36=104%13=0
    [3, 9, 6, 4, 7, 0],
]


def _ngram_config(**kw):
    return preset("tiny", **{**NGRAM_CFG, **kw})


def test_ngram_rows_match_hand_computed_example():
    cfg = _ngram_config()
    assert cfg.ngram_branches == 4 and cfg.ngram_base_modulus == 6
    rows = ngram_rows(torch.tensor([TOKENS]), cfg)
    assert rows.shape == (4, 1, 6)
    assert rows[:, 0].tolist() == EXPECTED_ROWS


def test_ngram_history_gives_the_rows_of_the_full_sequence():
    cfg = _ngram_config()
    x = torch.tensor([TOKENS])
    full = ngram_rows(x, cfg)
    P = cfg.oe_neighbor_num - 1
    for start in range(len(TOKENS)):
        history = torch.tensor([([-1] * P + TOKENS[:start])[-P:]])  # oldest first, -1 = before the start
        chunk = ngram_rows(x[:, start:], cfg, history)
        assert torch.equal(chunk, full[:, :, start:]), start
    # Without history a chunk is hashed as a fresh sequence: t4 would lose its look-back to x3.
    assert ngram_rows(x[:, 4:], cfg)[:, 0, 0].tolist() == [6, 6, 6, 6]


def _naive_rows(tokens: list[int], history: list[int], cfg) -> list[list[int]]:
    """The spec, one position at a time."""
    K, V, eos, M = cfg.oe_split_num, cfg.vocab_size, cfg.eos_token_id, cfg.ngram_base_modulus
    full = history + tokens
    out = []
    for b in range(cfg.ngram_branches):
        order, m = 2 + b // K, M + 2 * b + 1
        row = []
        for t in range(len(history), len(full)):
            acc = 0
            for j in range(order):
                if t - j < 0 or full[t - j] < 0:
                    break
                if j >= 1 and full[t - j] == eos:
                    break
                acc += full[t - j] * (V**j % m)
            row.append(acc % m)
        out.append(row)
    return out


def test_ngram_rows_match_naive_loop_on_random_packed_sequences():
    cfg = _ngram_config(vocab_size=37, oe_vocab_size_ratio=1.3, oe_neighbor_num=4, oe_split_num=2, hidden_size=12)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 37, (3, 30), generator=g)
    x[x % 5 == 0] = EOS  # many document ends
    hist = torch.randint(0, 37, (3, 3), generator=g)
    hist[0] = -1
    hist[1, 0] = -1
    hist[2, 1] = EOS
    rows = ngram_rows(x, cfg, hist)
    for i in range(3):
        h = [v for v in hist[i].tolist()]
        assert rows[:, i].tolist() == _naive_rows(x[i].tolist(), h, cfg), i


@pytest.mark.parametrize("scale_word", [True, False])
def test_ngram_embedding_equals_explicit_branch_sum(scale_word):
    cfg = _ngram_config(oe_scale_word_embedding=scale_word)
    torch.manual_seed(0)
    emb = NgramEmbedding(cfg)
    for p in emb.parameters():
        torch.nn.init.normal_(p)
    B, width = cfg.ngram_branches, cfg.hidden_size // cfg.ngram_branches
    assert [t.num_embeddings for t in emb.tables] == [7, 9, 11, 13]
    assert all(t.embedding_dim == width == 2 for t in emb.tables)
    x = torch.tensor([TOKENS])
    word = torch.randn(1, 6, cfg.hidden_size)
    out = emb(word, x)
    expected = torch.zeros(6, cfg.hidden_size)
    for t in range(6):
        grams = torch.zeros(cfg.hidden_size)
        for b in range(B):
            vec = emb.tables[b].weight[EXPECTED_ROWS[b][t]]  # (width,)
            proj_b = emb.proj.weight[:, b * width : (b + 1) * width]  # (H, width)
            grams = grams + proj_b @ vec
        if scale_word:
            expected[t] = (word[0, t] + grams) / (1 + B)
        else:
            expected[t] = word[0, t] + grams / (1 + B)
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_model_embedding_uses_ngram_history():
    cfg = preset("tiny")
    model = build_model(cfg, seed=0)
    x = torch.randint(3, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.embed(x)
        part = model.embed(x[:, 5:], ngram_history=x[:, 3:5])
        fresh = model.embed(x[:, 5:])
    torch.testing.assert_close(part, full[:, 5:], atol=0, rtol=0)
    assert (fresh - full[:, 5:]).abs().max() > 1e-4  # the history matters


# ---------------------------------------------------------------------------------------------------
# 2. LongCat sparse attention


def _tiny(**kw):
    return preset("tiny", **kw)  # index_topk 24, 4 sinks, 8 local


def test_lsa_is_exactly_dense_when_the_sequence_fits_the_budget():
    cfg = _tiny()
    T = cfg.index_topk
    model = build_model(cfg, seed=0).eval()
    dense_cfg = cfg.replace(index_n_heads=0)
    dense = build_model(dense_cfg, seed=1).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(".indexer." in k for k in unexpected)
    x = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sparse_logits = model(x).logits
        model.lsa_mode = "dense"
        dense_mode_logits = model(x).logits
        model.lsa_mode = "sparse"
        no_indexer_logits = dense(x).logits
    assert torch.equal(sparse_logits, dense_mode_logits)
    assert torch.equal(sparse_logits, no_indexer_logits)
    # Training with the indexer loss on: scores are computed, the attention stays dense.
    model.train()
    out = model(x, mtp=False, indexer_loss=True)
    assert out.indexer_loss is not None and torch.isfinite(out.indexer_loss)
    torch.testing.assert_close(out.logits.detach(), no_indexer_logits, atol=1e-6, rtol=0)


def test_lsa_is_sparse_when_the_sequence_exceeds_the_budget():
    cfg = _tiny()
    model = build_model(cfg, seed=0).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sparse = model(x).logits
        model.lsa_mode = "dense"
        dense = model(x).logits
    T0 = cfg.index_topk  # queries 0..23 see at most 24 keys: identical
    torch.testing.assert_close(sparse[:, :T0], dense[:, :T0], atol=1e-6, rtol=0)
    assert (sparse[:, T0:] - dense[:, T0:]).abs().max() > 1e-4


def _causal(B, T, S=None):
    S = S or T
    return (torch.arange(T).unsqueeze(-1) >= torch.arange(S)).unsqueeze(0).expand(B, T, S)


def test_select_tokens_keeps_sinks_local_window_and_top_scores():
    cfg = _tiny()
    topk, init, local = cfg.index_topk, cfg.index_init_tokens, cfg.index_local_tokens
    B, T = 2, 40
    scores = torch.randn(B, T, T, generator=torch.Generator().manual_seed(0))
    causal = _causal(B, T)
    keep = select_tokens(scores, causal, cfg)
    assert keep is not None and keep.shape == (B, T, T) and keep.dtype == torch.bool
    for b in range(B):
        for t in range(T):
            kept = set(keep[b, t].nonzero().flatten().tolist())
            if t + 1 <= topk:
                assert kept == set(range(t + 1)), t  # short queries see everything
                continue
            assert len(kept) == topk, t
            sinks, window = set(range(init)), set(range(t - local + 1, t + 1))
            assert sinks <= kept and window <= kept, t
            middle = list(range(init, t - local + 1))
            best = sorted(middle, key=lambda s: -scores[b, t, s].item())[: topk - init - local]
            assert kept == sinks | window | set(best), t
    assert select_tokens(scores[:, :topk, :topk], _causal(B, topk), cfg) is None


def test_select_tokens_breaks_ties_independently_of_key_span():
    """Decode (one query, keys 0..t) must pick what the full forward picks for row t.

    relu makes exact-zero index scores common, so tie-breaking must not depend on how many
    (non-causal) key columns the score tensor happens to have.
    """
    cfg = _tiny()
    g = torch.Generator().manual_seed(0)
    S = 40
    scores = torch.rand(1, S, S, generator=g)
    scores = torch.where(torch.rand(1, S, S, generator=g) < 0.5, torch.zeros(()), scores)
    full = select_tokens(scores, _causal(1, S), cfg)
    differing = []
    for t in range(cfg.index_topk, S):
        row = select_tokens(scores[:, t : t + 1, : t + 1], _causal(1, S)[:, t : t + 1, : t + 1], cfg)
        if not torch.equal(row[0, 0], full[0, t, : t + 1]):
            differing.append(t)
    assert not differing, f"selection of queries {differing} depends on the key span (tie-breaking)"


def test_indexer_scores_match_naive_formula():
    cfg = _tiny()
    model = build_model(cfg, seed=0)
    mla = model.layers[0].self_attn[0]
    idx = mla.indexer
    T, h, d = 6, cfg.index_n_heads, cfg.index_head_dim
    x = torch.randn(1, T, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(T).unsqueeze(0)
    cos, sin = model.rotary(positions, torch.float32)
    with torch.no_grad():
        q_lat = mla.q_a_layernorm(mla.q_a_proj(x))
        keys = idx.keys(x, cos, sin)
        scores = idx.scores(x, q_lat, keys, cos, sin)
        r = cfg.qk_rope_head_dim
        k = idx.k_norm(idx.wk(x))
        k = torch.cat([apply_rope(k[..., :r], cos, sin), k[..., r:]], -1)[0]  # (T, d)
        q = idx.wq_b(q_lat).view(T, h, d)
        q = torch.cat([apply_rope(q[None, ..., :r], cos, sin)[0], q[..., r:]], -1)
        w = idx.weights_proj(x)[0] * h**-0.5  # (T, h)
        for t in range(T):
            for s in range(T):
                ref = sum(w[t, i] * torch.relu(q[t, i] @ k[s]) for i in range(h)) * d**-0.5
                assert abs(scores[0, t, s].item() - ref.item()) < 1e-6


def _null_space_direction(weight: torch.Tensor, generator) -> torch.Tensor:
    """A random unit vector v with weight @ v = 0 (weight: (out, in), out < in)."""
    w = weight.double()
    _, _, vh = torch.linalg.svd(w)
    basis = vh[w.shape[0] :]  # (in - out, in), orthogonal to every row
    v = torch.randn(basis.shape[0], generator=generator, dtype=torch.float64) @ basis
    return (v / v.norm()).float()


def test_each_query_attends_only_to_the_selected_tokens():
    """End to end through the real indexer: move an input token along a direction the indexer key
    cannot see (null space of wk), so the selection stays put while its value changes."""
    cfg = _tiny()
    model = build_model(cfg, seed=0)
    mla0, mla1 = model.layers[0].self_attn
    assert mla0.indexer is not None and mla1.indexer is None
    T, t = 40, 39
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, cfg.hidden_size, generator=g)
    positions = torch.arange(T).unsqueeze(0)
    cos, sin = model.rotary(positions, torch.float32)
    ctx = AttentionContext(cos, sin, positions)
    delta = 3.0 * _null_space_direction(mla0.indexer.wk.weight, g)
    assert mla0.kv_a_proj_with_mqa(delta).abs().max() > 1e-2  # the value does see it
    with torch.no_grad():
        out, keep, _ = mla0(x, ctx, 0)
        assert keep is not None and int(keep[0, t].sum()) == cfg.index_topk
        far = range(cfg.index_init_tokens, t - cfg.index_local_tokens + 1)
        unselected = [s for s in far if not keep[0, t, s]]
        selected = [s for s in far if keep[0, t, s]]
        assert unselected and selected
        for s, should_change in ((unselected[0], False), (selected[0], True)):
            x2 = x.clone()
            x2[0, s] += delta
            out2, keep2, _ = mla0(x2, ctx, 0)
            assert torch.equal(keep2[0, t], keep[0, t])  # the indexer did not notice
            change = (out2[0, t] - out[0, t]).abs().max().item()
            assert (change > 1e-4) if should_change else (change < 1e-6), (s, change)

        # Sublayer 1 has no indexer: it honours the keep-mask it is given.
        s = unselected[0]
        x3 = x.clone()
        x3[0, s] += torch.randn(cfg.hidden_size, generator=g)
        a, _, _ = mla1(x, ctx, 1, keep)
        b, _, _ = mla1(x3, ctx, 1, keep)
        assert (a[0, t] - b[0, t]).abs().max() < 1e-6
        a, _, _ = mla1(x, ctx, 1, None)
        b, _, _ = mla1(x3, ctx, 1, None)
        assert (a[0, t] - b[0, t]).abs().max() > 1e-4  # dense: it does see it


def test_sublayer_one_reuses_sublayer_zero_selection():
    cfg = _tiny()
    model = build_model(cfg, seed=0).eval()
    returned, received = [], []
    for layer in model.layers:
        layer.self_attn[0].register_forward_hook(lambda m, args, out: returned.append(out[1]))
        layer.self_attn[1].register_forward_pre_hook(lambda m, args: received.append(args[3]))
    x = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    assert len(returned) == len(received) == cfg.num_layers
    for r, s in zip(returned, received):
        assert r is not None and s is r


# ---------------------------------------------------------------------------------------------------
# 3. multi-token prediction


def test_mtp_shapes_losses_and_gradients():
    cfg = _tiny(mtp_num_layers=2)
    model = build_model(cfg, seed=0)
    B, T, V = 2, 12, cfg.vocab_size
    x = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = x[:, :-1], x[:, 1:]
    model.train()
    out = model(inputs)  # mtp defaults to training
    assert [tuple(m.shape) for m in out.mtp_logits] == [(B, T - 1, V), (B, T - 2, V)]
    losses = lm_losses(out, labels)
    assert set(losses) == {"lm", "mtp1", "mtp2"}
    for v in losses.values():
        assert v.ndim == 0 and torch.isfinite(v)
    # mtp1 target is labels[t+1] = x[t+2]: check against a direct cross entropy
    ref = F.cross_entropy(out.mtp_logits[0].reshape(-1, V), x[:, 2:].reshape(-1))
    torch.testing.assert_close(losses["mtp1"], ref)
    (losses["mtp1"] + losses["mtp2"]).backward()
    for d in range(2):
        for name, p in model.mtp[d].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"mtp.{d}.{name}"
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(inputs).mtp_logits == []
        assert model(inputs, mtp=False).mtp_logits == []
        assert len(model(inputs, mtp=True).mtp_logits) == 2


def test_mtp_depth_d_reads_token_t_plus_d_and_nothing_later():
    cfg = _tiny(mtp_num_layers=2)
    model = build_model(cfg, seed=0).eval()
    T, t = 12, 4
    x = torch.randint(3, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))

    def mtp(ids):
        with torch.no_grad():
            return model(ids, mtp=True).mtp_logits

    base = mtp(x)
    for d in (1, 2):
        moved = x.clone()
        moved[0, t + d] = (x[0, t + d] + 1) % cfg.vocab_size
        assert (mtp(moved)[d - 1][0, t] - base[d - 1][0, t]).abs().max() > 1e-4, d
        later = x.clone()
        later[0, t + d + 1 :] = (x[0, t + d + 1 :] + 7) % cfg.vocab_size
        changed = mtp(later)
        torch.testing.assert_close(changed[d - 1][0, : t + 1], base[d - 1][0, : t + 1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 4. identity experts and 5. grouped-GEMM experts


def _moe(cfg, seed=0):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
    return moe


def test_identity_expert_contributes_exactly_weight_times_x():
    cfg = _tiny(moe_topk=1)
    moe = _moe(cfg)
    N = cfg.n_routed_experts
    entry = N + 1  # the second identity expert
    moe.router.e_score_correction_bias[entry] = 1e4
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        out, stats = moe(x)
        flat = x.reshape(-1, cfg.hidden_size)
        probs = F.linear(flat.float(), moe.router.classifier.weight.float()).softmax(-1)
        expected = flat * (probs[:, entry] * cfg.routed_scaling_factor).unsqueeze(1)
    assert torch.equal(out.reshape(-1, cfg.hidden_size), expected)
    assert stats.counts.tolist() == [0] * entry + [10] + [0] * (cfg.num_experts_total - entry - 1)


def _expert_ffn(experts: GroupedExperts, e: int, v: torch.Tensor) -> torch.Tensor:
    F_ = experts.inner
    gate_up = experts.gate_up_proj[e]  # (2F, H)
    gate, up = gate_up[:F_] @ v, gate_up[F_:] @ v
    return experts.down_proj[e] @ (F.silu(gate) * up)


def test_moe_matches_naive_per_token_loop_with_mixed_experts():
    cfg = _tiny()  # N=8 FFN + Z=4 identity experts, k=3
    moe = _moe(cfg, seed=1)
    N, k, scale = cfg.n_routed_experts, cfg.moe_topk, cfg.routed_scaling_factor
    g = torch.Generator().manual_seed(0)
    moe.router.e_score_correction_bias.copy_(torch.randn(cfg.num_experts_total, generator=g) * 0.05)
    moe.router.e_score_correction_bias[N:] += 0.05  # make identity picks common
    x = torch.randn(24, cfg.hidden_size, generator=g)
    with torch.no_grad():
        out, _ = moe(x)
        W = moe.router.classifier.weight
        bias = moe.router.e_score_correction_bias
        n_identity = n_ffn = 0
        for i in range(x.shape[0]):
            logits = [float(W[e] @ x[i]) for e in range(cfg.num_experts_total)]
            probs = torch.tensor(logits, dtype=torch.float64).softmax(0)
            ranked = sorted(range(cfg.num_experts_total), key=lambda e: -(probs[e].item() + bias[e].item()))
            ref = torch.zeros(cfg.hidden_size, dtype=torch.float64)
            for e in ranked[:k]:
                w = probs[e].item() * scale
                if e >= N:
                    ref += w * x[i].double()
                    n_identity += 1
                else:
                    ref += w * _expert_ffn(moe.experts, e, x[i]).double()
                    n_ffn += 1
            torch.testing.assert_close(out[i].double(), ref, atol=1e-5, rtol=1e-4)
    assert n_identity > 0 and n_ffn > 0


def _experts_and_rows(counts, seed=0):
    torch.manual_seed(seed)
    N, H, Fi = len(counts), 32, 16
    experts = GroupedExperts(N, H, Fi)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    x = torch.randn(sum(counts), H, requires_grad=True)
    return experts, x, torch.tensor(counts)


def test_grouped_experts_equal_per_expert_loop_forward_and_backward():
    counts = [3, 0, 5, 0, 2, 4, 0, 1]  # experts 1, 3 and 6 receive no tokens
    experts, x, c = _experts_and_rows(counts)
    out = experts(x, c)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    got = (x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    for p in experts.parameters():
        p.grad = None
    pieces, start = [], 0
    for e, n in enumerate(counts):
        rows = x_ref[start : start + n]  # (n, H)
        gate_up = rows @ experts.gate_up_proj[e].T
        gate, up = gate_up.split(experts.inner, dim=-1)
        pieces.append((F.silu(gate) * up) @ experts.down_proj[e].T)
        start += n
    ref = torch.cat(pieces)
    ref.backward(grad_out)
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], experts.gate_up_proj.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], experts.down_proj.grad, atol=1e-5, rtol=1e-5)
    for e in (1, 3, 6):
        assert got[1][e].abs().max() == 0 and got[2][e].abs().max() == 0
    assert got[1][0].abs().max() > 0


def test_grouped_experts_under_bf16_autocast_are_finite_and_close():
    counts = [4, 0, 6, 2, 0, 3, 1, 0]
    experts, x, c = _experts_and_rows(counts, seed=2)
    with torch.no_grad():
        ref = experts(x, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, c)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    out.float().pow(2).sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32
    assert torch.isfinite(experts.gate_up_proj.grad).all() and torch.isfinite(x.grad).all()
    # no rows at all: zeros of the right shape
    empty = experts(torch.zeros(0, 32), torch.zeros(8, dtype=torch.long))
    assert empty.shape == (0, 32)


# ---------------------------------------------------------------------------------------------------
# 6. causality and the latent-cache (absorbed) path


def test_full_model_is_causal():
    cfg = _tiny()  # T = 40 > index_topk: the sparse selection is in play
    model = build_model(cfg, seed=0).eval()
    x = torch.randint(3, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 30] = (x[:, 30] + 5) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :30], b[:, :30], atol=1e-6, rtol=0)
    assert (a[:, 30:] - b[:, 30:]).abs().max() > 1e-4


@pytest.mark.parametrize("lsa", [True, False], ids=["lsa", "dense"])
def test_latent_cache_decode_equals_full_forward(lsa):
    cfg = _tiny() if lsa else _tiny(index_n_heads=0)
    model = build_model(cfg, seed=0).eval()
    B, T, prefill = 2, 40, 28  # prefill and decode both run past index_topk = 24
    x = torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    x[0, 8] = cfg.eos_token_id  # a document boundary inside the prefill
    x[1, 33] = cfg.eos_token_id  # ... and one inside the decode
    P = cfg.oe_neighbor_num - 1
    with torch.no_grad():
        full = model(x).logits
        cache = LatentCache(cfg, B, 64)
        chunks = [model(x[:, :prefill], cache=cache).logits]
        for p in range(prefill, T):
            chunks.append(
                model(
                    x[:, p : p + 1], positions=torch.full((B, 1), p), cache=cache, ngram_history=x[:, p - P : p]
                ).logits
            )
    stepwise = torch.cat(chunks, dim=1)
    err = (stepwise - full).abs().amax(dim=(0, 2))
    bad = (err > 1e-5).nonzero().flatten().tolist()
    assert not bad, f"positions {bad} differ (max {err.max().item():.2e})"


# ---------------------------------------------------------------------------------------------------
# 7. router statistics


def test_router_stats():
    cfg = _tiny()
    model = build_model(cfg, seed=0)
    L, N, k = cfg.num_layers, cfg.n_routed_experts, cfg.moe_topk
    B, T = 2, 16
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    stats = model(x, mtp=False).router
    assert stats.counts.shape == (L, cfg.num_experts_total)
    assert stats.counts.sum(-1).tolist() == [B * T * k] * L
    share = stats.zero_expert_share
    assert 0.0 <= share <= 1.0
    assert share == pytest.approx(float(stats.counts[:, N:].sum()) / (L * B * T * k))
    torch.testing.assert_close(stats.expert_load.sum(-1), torch.ones(L))
    counts = count_parameters(cfg)
    slot, base = counts.expert_slot_params_per_layer, counts.base_active_params
    assert base <= stats.active_params_per_token <= base + k * slot * L
    assert stats.active_params_per_token == pytest.approx(base + stats.ffn_slots_per_token * slot * L)
    assert stats.ffn_slots_per_token == pytest.approx((1 - share) * k)
    loss = stats.balance_loss()
    assert loss.requires_grad and torch.isfinite(loss)
    loss.backward()
    grad = model.layers[0].mlp.router.classifier.weight.grad
    assert grad is not None and grad.abs().sum() > 0

    # every slot on identity experts: share 1, only the base parameters are active
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router.e_score_correction_bias[N:] = 1e4
        stats = model(x, mtp=False).router
    assert stats.zero_expert_share == 1.0
    assert stats.active_params_per_token == base
