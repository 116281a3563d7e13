"""A decode-only forward pass: the model's own math and weights, in far fewer tensor operations.

At decode a forward handles a few tokens per row, so its time goes into per-operation overhead,
not arithmetic: `model.forward` spends about 0.3 ms per MLA sublayer and, on CPU, about 1 ms per
MoE block (torch._grouped_mm walks every one of the N expert groups, empty or not). This module
runs the same computation for decode steps:

- MLA in the absorbed form over the cached latents, with the shared key head computed once per
  row instead of expanded to every head, and no copy of the cache per step;
- the MoE router as in the model, then only the experts that were chosen (one small GEMM pair
  each) when few tokens are in flight; larger batches use the model's grouped path;
- everything else calls the model's own pieces (embedding with n-grams, rotary tables, the LSA
  indexer and `select_tokens`, norms, the output head), so it reads the very same parameters:
  no copies, nothing to go stale when the weights change.

`tests/test_infer.py` checks it against `model.forward` on every feature (n-grams, sparse
attention over cached indexer keys, identity experts, MTP heads); the engine's `fast=False` runs
the model's forward instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import AttentionContext, LatentCache, LongCatForCausalLM, select_tokens

# With at most this many distinct experts in use, loop over them (one GEMM pair each); with more,
# use the model's grouped GEMMs (on CPU, torch._grouped_mm pays for every expert, used or not).
LOOP_EXPERTS = 96


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm with the module's weight: one fused call in fp32; other dtypes go through the module
    (it normalises in fp32 and casts back before the weight, as the reference does)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, module.weight.shape, module.weight, module.eps)
    return module(x)


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as a matrix: x @ R equals apply_rope(x) (interleaved pairs in, halves out).

    cos, sin (B, T, r/2) -> R (B*T, r, r), so that every sublayer rotates with one small bmm.
    """
    B, T, half = cos.shape
    r = 2 * half
    R = cos.new_zeros(B * T, r, r)
    j = torch.arange(half, device=cos.device)
    c, s = cos.reshape(B * T, half), sin.reshape(B * T, half)
    R[:, 2 * j, j] = c
    R[:, 2 * j + 1, j] = -s
    R[:, 2 * j + 1, half + j] = c
    R[:, 2 * j, half + j] = s
    return R


def _swiglu(mlp, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)


class FastDecoder:
    """model.forward for decode steps (tokens at given positions over a LatentCache), leaner."""

    def __init__(self, model: LongCatForCausalLM) -> None:
        self.model = model
        self.config = model.config
        self._views: dict[int, tuple] = {}

    def _expert_views(self, experts):
        """Per-expert (H, 2F) and (F, H) views of the stacked expert weights (no copies), made once
        and remade whenever the parameters are replaced."""
        key = (experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr())
        cached = self._views.get(id(experts))
        if cached is None or cached[0] != key:
            gate_up_t = experts.gate_up_proj.detach().transpose(1, 2).unbind(0)
            down_t = experts.down_proj.detach().transpose(1, 2).unbind(0)
            cached = self._views[id(experts)] = (key, gate_up_t, down_t)
        return cached[1], cached[2]

    # --- attention -------------------------------------------------------------------------------
    def attention(self, attn, x, cos, sin, rot, positions, cache: LatentCache, sublayer: int, keep, causal):
        """One MLA sublayer over the latent cache. x (B, T, H) normed -> (out (B, T, H), keep).

        rot: rotation(cos, sin), the RoPE matrices of these positions."""
        B, T, _ = x.shape
        h, nope, rope, kv = attn.n_heads, attn.nope, attn.rope, attn.kv_lora
        q_latent = _norm(attn.q_a_layernorm, F.linear(x, attn.q_a_proj.weight))  # (B, T, q_lora)
        q = F.linear(q_latent, attn.q_b_proj.weight).view(B, T, h, nope + rope)
        q_nope, q_rope = q.split([nope, rope], dim=-1)
        q_rope = torch.bmm(q_rope.reshape(B * T, h, rope), rot).view(B, T, h, rope)
        c_kv, k_rope = F.linear(x, attn.kv_a_proj_with_mqa.weight).split([kv, rope], dim=-1)
        c_kv = _norm(attn.kv_a_layernorm, c_kv) * attn.kv_scale
        k_rope = torch.bmm(k_rope.reshape(B * T, 1, rope), rot).view(B, T, rope)
        c_all, r_all = cache.write(sublayer, positions, c_kv, k_rope)  # (B, S, kv), (B, S, rope)

        if attn.indexer is not None:
            keep = self._select(attn, x, q_latent, cos, sin, positions, cache, sublayer // 2, causal)
        mask = causal if keep is None else keep  # (B, T, S)

        # absorbed attention: fold W_uk into the query, attend over the latents of one shared head
        w_uk, w_uv = attn.absorbed_weights()  # (h, nope, kv), (h, v, kv)
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(h, B * T, nope), w_uk)  # (h, B*T, kv)
        q_lat = q_lat.view(h, B, T, kv).transpose(0, 1).reshape(B, h * T, kv)
        q_rope = q_rope.permute(0, 2, 1, 3).reshape(B, h * T, rope)
        scores = torch.baddbmm(torch.bmm(q_rope, r_all.transpose(1, 2)), q_lat, c_all.transpose(1, 2))
        scores = scores.view(B, h, T, -1).float() * attn.scale
        probs = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1).to(c_all.dtype)
        o_lat = torch.bmm(probs.view(B, h * T, -1), c_all)  # (B, h*T, kv)
        o_lat = o_lat.view(B, h, T, kv).transpose(0, 1).reshape(h, B * T, kv)
        out = torch.bmm(o_lat, w_uv.transpose(1, 2))  # (h, B*T, v)
        out = out.view(h, B, T, -1).permute(1, 2, 0, 3).reshape(B, T, -1)
        return F.linear(out, attn.o_proj.weight), keep

    def _select(self, attn, x, q_latent, cos, sin, positions, cache, layer, causal):
        indexer = attn.indexer
        keys = cache.write_index(layer, positions, indexer.keys(x, cos, sin))
        if int(causal.sum(-1).max()) <= self.config.index_topk or self.model.lsa_mode != "sparse":
            return None  # every query sees at most index_topk keys: exactly dense
        scores = indexer.scores(x, q_latent, keys, cos, sin)
        return select_tokens(scores, causal, self.config)

    # --- MoE ---------------------------------------------------------------------------------------
    def moe(self, moe, x: torch.Tensor) -> torch.Tensor:
        """The MoE block for a few tokens: route as the model does, run only the chosen experts."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router, N = moe.router, moe.num_experts
        logits = F.linear(x.float(), router.classifier.weight.float())
        probs = logits.softmax(dim=-1)
        indices = torch.topk(probs + router.e_score_correction_bias, router.top_k, dim=-1, sorted=False).indices
        weights = probs.gather(1, indices) * router.scaling  # (T, k) fp32
        is_expert = indices < N
        out = x * (weights * ~is_expert).sum(-1, keepdim=True).to(x.dtype)  # identity experts
        # (token, slot) pairs that go to FFN experts, sorted by expert
        flat = indices.flatten()
        pairs = is_expert.flatten().nonzero().squeeze(1)
        order = pairs[torch.argsort(flat[pairs], stable=True)]
        counts = torch.bincount(flat[order], minlength=N).tolist()
        used = [(e, c) for e, c in enumerate(counts) if c]
        if not used:
            return out.reshape(shape)
        if len(used) > LOOP_EXPERTS:
            # many experts in use: the model's grouped GEMMs pay off
            rows, expert_counts, state = moe.dispatcher.dispatch(x, _Routing(indices, weights), N)
            return moe.dispatcher.combine(moe.experts(rows, expert_counts), state, out).reshape(shape)
        gate_up_t, down_t = self._expert_views(moe.experts)
        tokens = order // indices.shape[1]
        xs = x[tokens]  # (M, H) rows grouped by expert
        ys, a = [], 0
        for e, c in used:  # one GEMM pair per expert actually chosen, none for the others
            gate, up = torch.mm(xs[a : a + c], gate_up_t[e]).chunk(2, dim=-1)
            ys.append(torch.mm(F.silu(gate) * up, down_t[e]))
            a += c
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        gates = weights.flatten()[order].to(x.dtype).unsqueeze(1)
        return out.index_add_(0, tokens, y * gates).reshape(shape)

    # --- whole model -------------------------------------------------------------------------------
    def forward(self, ids, positions, cache: LatentCache, history=None, *, last_only: bool = True):
        """ids, positions (B, T) -> (logits (B, 1 or T, V), pre-norm hidden (B, T, H))."""
        model = self.model
        cache.begin(positions)
        h = model.embed(ids, history)
        cos, sin = model.rotary(positions, h.dtype)
        rot = rotation(cos, sin)
        S = cache._span
        causal = positions.unsqueeze(-1) >= torch.arange(S, device=ids.device)  # (B, T, S)
        for i, layer in enumerate(model.layers):
            attn, keep = self.attention(layer.self_attn[0], _norm(layer.input_layernorm[0], h), cos, sin, rot,
                                        positions, cache, 2 * i, None, causal)
            h = h + attn
            u = _norm(layer.post_attention_layernorm[0], h)
            moe_out = self.moe(layer.mlp, u)  # joins at the end of the layer, as in the model
            h = h + _swiglu(layer.mlps[0], u)
            attn, _ = self.attention(layer.self_attn[1], _norm(layer.input_layernorm[1], h), cos, sin, rot,
                                     positions, cache, 2 * i + 1, keep, causal)
            h = h + attn
            h = h + _swiglu(layer.mlps[1], _norm(layer.post_attention_layernorm[1], h)) + moe_out
        normed = _norm(model.norm, h[:, -1:] if last_only else h)
        return model.lm_head(normed), h

    def mtp(self, depth: int, emb, prev, positions, cache: LatentCache):
        """MTP head `depth` (1-based): emb of the token `depth` ahead, previous hidden (B, T, H)
        -> (hidden, normed hidden), as MTPLayer.forward with the cache."""
        head = self.model.mtp[depth - 1]
        cache.begin(positions)
        cos, sin = self.model.rotary(positions, emb.dtype)
        causal = positions.unsqueeze(-1) >= torch.arange(cache._span, device=positions.device)
        h = F.linear(torch.cat([_norm(head.enorm, emb), _norm(head.hnorm, prev)], dim=-1), head.eh_proj.weight)
        attn, _ = self.attention(head.self_attn, _norm(head.input_layernorm, h), cos, sin, rotation(cos, sin),
                                 positions, cache, head.sublayer, None, causal)
        h = h + attn
        h = h + _swiglu(head.mlp, _norm(head.post_attention_layernorm, h))
        return h, _norm(head.final_layernorm, h)

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The output head, as the draft heads use it."""
        return self.model.lm_head(normed)

    def prepare(self) -> None:
        """Called before each generation (the compiled runner re-packs weights there)."""

    @staticmethod
    def cache_rows(batch: int) -> int:
        """Cache rows a batch of `batch` sequences needs (the compiled runner pads to buckets)."""
        return batch


class _Routing:
    """The two fields of moe.Routing the dispatcher reads."""

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.indices, self.weights = indices, weights


class ModelForward:
    """The same interface over model.forward itself (Engine(fast=False)): the reference path."""

    def __init__(self, model: LongCatForCausalLM) -> None:
        self.model = model

    def forward(self, ids, positions, cache, history=None, *, last_only: bool = True):
        out = self.model(ids, positions=positions, cache=cache, ngram_history=history, mtp=False,
                         indexer_loss=False, logits_to_keep=1 if last_only else 0)
        return out.logits, out.pre_norm_hidden

    def mtp(self, depth: int, emb, prev, positions, cache):
        model = self.model
        cos, sin = model.rotary(positions, emb.dtype)
        cache.begin(positions)
        ctx = AttentionContext(cos, sin, positions, cache, sparse=model.lsa_mode == "sparse")
        return model.mtp[depth - 1](emb, prev, ctx)

    head = FastDecoder.head
    prepare = FastDecoder.prepare
    cache_rows = staticmethod(FastDecoder.cache_rows)


__all__ = ["FastDecoder", "ModelForward", "LOOP_EXPERTS"]
