"""Decode steps as one compiled graph: `torch.compile` (inductor) over the whole decode forward.

At batch 1 a decode step of a small model is a few hundred tiny operations around weight GEMVs.
`FastDecoder` (decode.py) trims the operation count; this module removes the per-operation cost
altogether: the step is written as one pure function of the model's parameters, the new tokens'
embeddings and a read-only view of the latent cache, and inductor turns it into a handful of fused
C++ loops called from a C++ wrapper (`cpp_wrapper`), with no Python between them.

Five choices matter for speed on CPU (measured in docs/INFERENCE.md):

- Weight products with few rows are written as multiply-and-sum reductions, which inductor
  generates and fuses with the norm or activation around them. MKL's GEMV on PyTorch's
  (out, in) weight layout streams weights at about a third of this machine's memory bandwidth;
  the generated loop reads each weight row once, for every row of the input.
- With 4-8 rows those products call a hand-written C++ kernel instead (`longcat::rows_linear`,
  kernels.py): the same loop plus a software prefetch of the weights, which keeps the weight
  stream ahead of the arithmetic.
- The MoE runs only the chosen experts with static shapes: every (token, slot) pair reads its
  expert's weights by index, and zero-computation slots point at an expert the token already uses
  (read from cache).
- Attention runs over the cached latents in place (absorbed MLA, one shared key head): the cache
  is an input, never copied, and the new tokens' keys are returned and written after the step.
- The weights live in one flat buffer in transparent huge pages (`PackedWeights`,
  `_weight_buffer`): every step streams them all, and 4 KB pages cost a TLB miss each.

The cache length changes every step and the engine re-allocates its cache for a longer generation
or a larger batch: the length and the allocation are marked dynamic from the first call
(`_length_marker`, `_allocation`), so one graph serves every length and allocation (left to
automatic dynamic shapes, each would be a constant in the first graph and cost a recompile when it
first changed). The batch size stays a constant: a batch runs padded to its row bucket
(ROW_BUCKETS), one graph per bucket (and per tokens-per-row count), and finishing rows move it down
the buckets instead of making it a symbol. Compilation takes tens of seconds per graph the first
time and is cached on disk by inductor afterwards. The weights go in as a few flat buffers
(`PackedWeights`): every graph input costs guard checks on every call.

The MTP draft heads and the output head they feed are compiled the same way (`mtp_graph`,
`head_graph`). Where a compiled graph does not apply, steps run through `FastDecoder` with the
same results: LongCat sparse attention once a context outgrows `index_topk` (the selection is
data-dependent) and more than `MAX_ROWS` rows. If compilation itself fails (no C++ compiler, an
unsupported device), the engine warns once and decodes with `FastDecoder`.
"""

from __future__ import annotations

import functools
import mmap
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LatentCache, LongCatForCausalLM
from ..model.layers import apply_rope
from . import kernels
from .decode import FastDecoder

# Rows (tokens in flight) up to which weight products are generated reductions on CPU; above it,
# the BLAS GEMM, whose register blocking wins once the weights are reused across many rows.
REDUCTION_ROWS = 8
# Rows from which those products call the prefetching kernel (kernels.py) when it is built: with 4
# and more rows the hardware prefetchers fall behind the arithmetic (bare step, one thread: 2.9-3.1
# -> 2.2-2.4 ms at 4 rows, 4.4-4.6 -> 3.9-4.0 ms at 8); with 1 or 2, the generated loop fused with
# the norm or activation before it is as fast or faster.
KERNEL_ROWS = 4
INDUCTOR_OPTIONS = {"cpp_wrapper": True}
# Rows up to which a step runs compiled at all (beyond, the gathered-expert MoE does too much work).
MAX_ROWS = 64
# Batch sizes the graphs are compiled for: a batch runs padded to the next one, so that a finishing
# row reuses a graph instead of compiling another, and the batch size stays a constant in generated
# code (a symbolic row count turns the weight loops into a slower generic form).
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Tensors the decode graph does not read (the MTP heads have graphs of their own; embeddings run outside).
NOT_IN_DECODE_GRAPH = ("mtp.", "embed_tokens.", "ngram.")


def row_bucket(rows: int) -> int:
    """The compiled batch size that serves `rows` rows (rows itself above the largest bucket)."""
    return next((b for b in ROW_BUCKETS if b >= rows), rows)


def _realized(x: torch.Tensor) -> torch.Tensor:
    """x itself, computed into a buffer once. Inductor otherwise inlines a cheap producer (a norm,
    an activation) into the reduction that reads it, recomputing it for every weight row: an
    as_strided view needs real storage, so the producer is realized first (the view is free)."""
    return torch.as_strided(x, x.shape, x.stride())


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w (out, in).T, as a generated reduction for few rows on CPU."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > REDUCTION_ROWS:
        return F.linear(x, w)
    if isinstance(rows, int) and rows >= KERNEL_ROWS and kernels.rows_linear_applies(x, w, rows):
        # the generated loop plus a weight prefetch (csrc/rows_linear.cpp)
        y = torch.ops.longcat.rows_linear(x.reshape(rows, x.shape[-1]), w)  # (rows, out)
        return y.reshape(*x.shape[:-1], w.shape[0])
    flat = _realized(x.reshape(rows, x.shape[-1]))
    if isinstance(rows, int) and rows > 1:
        # a known, small row count: one single-row reduction each (vectorised along `in`, the
        # fast form), rather than one reduction over (out, rows) whose loops inductor orders badly
        y = torch.stack([(w * flat[r]).sum(-1) for r in range(rows)])  # (rows, out)
        return y.reshape(*x.shape[:-1], w.shape[0])
    y = (w.unsqueeze(1) * flat.unsqueeze(0)).sum(-1)  # (out, rows): each weight row streamed once
    return y.t().reshape(*x.shape[:-1], w.shape[0])


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as the model's module: normalise in fp32, cast back, then the weight."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass(frozen=True)
class _Shape:
    """The constants the graph needs (Python numbers, so nothing is looked up on modules)."""

    layers: int
    heads: int
    nope: int
    rope: int
    v_dim: int
    kv: int
    norm_eps: float
    mla_eps: float
    kv_scale: float
    scale: float
    rope_factor: float
    experts: int
    top_k: int
    routed_scaling: float
    indexer: bool

    @classmethod
    def of(cls, model: LongCatForCausalLM) -> "_Shape":
        c, attn = model.config, model.layers[0].self_attn[0]
        router = model.layers[0].mlp.router
        return cls(c.num_layers, attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_lora, c.rms_norm_eps,
                   c.mla_norm_eps, attn.kv_scale, attn.scale, model.rotary.attention_factor,
                   model.layers[0].mlp.num_experts, router.top_k, router.scaling, attn.indexer is not None)


# Below this, a buffer gains little from huge pages (a huge page is 2 MB).
HUGE_PAGE_MIN_BYTES = 4 << 20


def _weight_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for the packed weights. On CPU under Linux, fresh private memory
    advised for transparent huge pages (THP in "madvise" mode, the common default, gives them only
    to memory that asks): every decode step streams all the weights, and with 4 KB pages each page
    costs a TLB miss and stops the hardware prefetchers at its boundary. Measured on the `small`
    preset, bare decode graph, one thread: batch 1 1.8-2.1 -> 1.3-1.4 ms, batch 8 6.0-6.4 -> 4.5-4.6
    ms. Elsewhere, or if the OS refuses, an ordinary allocation."""
    nbytes = numel * dtype.itemsize
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if torch.device(device).type != "cpu" or advise is None or nbytes < HUGE_PAGE_MIN_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    try:
        # private and anonymous: shared anonymous memory is shmem, which THP does not back by default
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(advise)  # before the first touch: pages fault in huge
    except (OSError, ValueError, AttributeError):
        return torch.empty(numel, dtype=dtype, device=device)
    return torch.frombuffer(memory, dtype=dtype, count=numel)  # keeps `memory` alive


class PackedWeights:
    """The model's parameters and buffers, re-pointed into one flat buffer per dtype and device.

    Every tensor stays the model's own (a view into the flat buffer: no second copy; in-place
    updates are seen), and the compiled graphs take the few flat buffers as their only weight
    inputs, slicing them at offsets that are literals in generated code. A graph input costs
    guard checks on every call (about 1.5 us per tensor here); 130 separate weights cost more
    than a tenth of a decode step.
    """

    def __init__(self, model: LongCatForCausalLM) -> None:
        self.model = model
        self.pack()

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(self.model.named_buffers(remove_duplicate=False))
        return named

    @torch.no_grad()
    def pack(self) -> None:
        tensors = self._tensors()
        groups: dict[tuple, list[str]] = {}
        seen: dict[int, str] = {}  # tied weights are packed once
        self.alias: dict[str, str] = {}
        for name, t in tensors.items():
            if id(t) in seen:
                self.alias[name] = seen[id(t)]
                continue
            seen[id(t)] = name
            groups.setdefault((t.dtype, t.device), []).append(name)
        flats, self.where = [], {}
        for g, ((dtype, device), names) in enumerate(groups.items()):
            flat = _weight_buffer(sum(tensors[n].numel() for n in names), dtype, device)
            offset = 0
            for n in names:
                t, size = tensors[n], tensors[n].numel()
                flat[offset : offset + size].copy_(t.detach().reshape(-1))
                t.data = flat[offset : offset + size].view(t.shape)
                self.where[n] = (g, offset, size, tuple(t.shape))
                offset += size
            flats.append(flat)
        self.flats = tuple(flats)
        self._pointers = [(t, t.data_ptr()) for t in tensors.values()]

    def current(self) -> bool:
        """Whether every tensor still lives in the flat buffers (a `.to()`, a `.data =`, a
        load_state_dict(assign=True) re-allocates it)."""
        return all(t.data_ptr() == ptr for t, ptr in self._pointers) and len(self._pointers) == len(self._tensors())

    def unpacker(self, names: dict[str, str]):
        """A function flats -> {graph name: view}, for names {graph name: state-dict name}. The
        offsets and shapes are literals in its code, so torch.compile does not guard on them."""
        lines = ["def unpack(flats):", "    return {"]
        for key, name in names.items():
            g, offset, size, shape = self.where[self.alias.get(name, name)]
            lines.append(f"        {key!r}: flats[{g}][{offset}:{offset + size}].view({shape!r}),")
        lines.append("    }")
        namespace: dict = {}
        exec("\n".join(lines), namespace)  # noqa: S102 - generated from our own tensor layout
        return namespace["unpack"]


def _attention(W, p: str, d: _Shape, x, cos, sin, c_old, r_old, visible):
    """One MLA sublayer, absorbed, over cached latents plus the step's own keys.

    x (B, T, H) normed input; c_old (B, S, kv), r_old (B, S, rope) the cache (read only);
    visible (B, T, 1, S + T) which cached and new keys each query sees.
    Returns out (B, T, H) and the new keys c_kv (B, T, kv), k_rope (B, T, rope).
    """
    B, T, _ = x.shape
    h, nope, rope, kv = d.heads, d.nope, d.rope, d.kv
    q_latent = _norm(_linear(x, W[p + "q_a_proj.weight"]), W[p + "q_a_layernorm.weight"], d.mla_eps)
    q = _linear(q_latent, W[p + "q_b_proj.weight"]).view(B, T, h, nope + rope)
    q_nope, q_rope = q.split([nope, rope], dim=-1)
    q_rope = apply_rope(q_rope, cos, sin)  # (B, T, h, rope)
    c_kv, k_rope = _linear(x, W[p + "kv_a_proj_with_mqa.weight"]).split([kv, rope], dim=-1)
    c_kv = _norm(c_kv, W[p + "kv_a_layernorm.weight"], d.mla_eps) * d.kv_scale  # (B, T, kv)
    k_rope = apply_rope(k_rope, cos, sin)  # (B, T, rope)

    w = W[p + "kv_b_proj.weight"].view(h, nope + d.v_dim, kv)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # (h, nope, kv), (h, v, kv)
    q_lat = (q_nope.unsqueeze(-1) * w_uk).sum(-2)  # (B, T, h, kv): W_uk folded into the query
    q_lat5, q_rope5 = q_lat.unsqueeze(3), q_rope.unsqueeze(3)  # (B, T, h, 1, .)
    s_old = (q_lat5 * c_old[:, None, None]).sum(-1) + (q_rope5 * r_old[:, None, None]).sum(-1)  # (B, T, h, S)
    s_new = (q_lat5 * c_kv[:, None, None]).sum(-1) + (q_rope5 * k_rope[:, None, None]).sum(-1)  # (B, T, h, T)
    scores = torch.cat([s_old, s_new], -1).float() * d.scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(x.dtype)  # (B, T, h, S + T)
    S = c_old.shape[1]
    # over the cache a BLAS batched GEMM: the reduction runs along S, which a generated loop
    # walks with the stride of a cache row (slow once contexts reach hundreds of tokens)
    o_old = torch.bmm(probs[..., :S].reshape(B, T * h, S), c_old).view(B, T, h, kv)
    o_lat = o_old + (probs[..., S:, None] * c_kv[:, None, None]).sum(-2)
    out = (o_lat.unsqueeze(-2) * w_uv).sum(-1)  # (B, T, h, v): W_uv applied per head
    return _linear(out.reshape(B, T, h * d.v_dim), W[p + "o_proj.weight"]), c_kv, k_rope


def _mlp(W, p: str, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = W[p + "gate_proj.weight"], W[p + "up_proj.weight"], W[p + "down_proj.weight"]
    return _linear(F.silu(_linear(x, gate)) * _linear(x, up), down)


def _moe(W, p: str, d: _Shape, x: torch.Tensor) -> torch.Tensor:
    """The MoE block with static shapes: route as the model does, then every (token, slot) pair
    reads its own expert's weights, in (token, slot) order."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (M, H)
    N, k = d.experts, d.top_k
    probs = _linear(x.float(), W[p + "router.classifier.weight"].float()).softmax(dim=-1)
    indices = torch.topk(probs + W[p + "router.e_score_correction_bias"], k, dim=-1, sorted=False).indices
    weights = probs.gather(1, indices) * d.routed_scaling  # (M, k) fp32
    is_ffn = indices < N
    out = x * (weights * ~is_ffn).sum(-1, keepdim=True).to(x.dtype)  # zero-computation (identity) experts
    # identity slots borrow an expert their token already uses (weight 0): its rows are cache-hot
    borrowed = indices.gather(1, is_ffn.int().argmax(1, keepdim=True))
    # realized: one load per pair in the weight loops, not the chain of gathers that computes it
    expert = _realized(torch.where(is_ffn, indices, borrowed).clamp(max=N - 1).flatten())  # (P,) P = M*k
    gate = (weights * is_ffn).flatten().to(x.dtype)  # (P,)
    xs = _realized(x[:, None, :].expand(-1, k, -1).reshape(-1, shape[-1]))  # (P, H)
    gate_up = (W[p + "experts.gate_up_proj"][expert] * xs[:, None, :]).sum(-1)  # (P, 2F)
    g, u = gate_up.chunk(2, dim=-1)
    act = _realized(F.silu(g) * u)  # (P, F)
    # realized per pair (each expert's rows read once): fused into the per-token sum instead,
    # every output element would walk all k experts' rows. The sum is over a reshape, not an
    # index_add: a scatter here was read before it was complete when inductor fused it with its
    # readers (torch 2.13, seen with an extern kernel after it)
    y = _realized((W[p + "experts.down_proj"][expert] * act[:, None, :]).sum(-1) * gate[:, None])  # (P, H)
    return (out + y.view(-1, k, shape[-1]).sum(1)).reshape(shape)


def _rotary(inv_freq: torch.Tensor, positions: torch.Tensor, d: _Shape, dtype: torch.dtype):
    """RotaryEmbedding.forward: cos, sin (B, T, rope/2) of the positions."""
    freqs = positions.float()[..., None] * inv_freq.float()
    return (freqs.cos() * d.rope_factor).to(dtype), (freqs.sin() * d.rope_factor).to(dtype)


def _visible(positions: torch.Tensor, S: int) -> torch.Tensor:
    """(B, T, 1, S + T): each query sees its row's cached keys below its first position, and the
    step's own keys up to itself."""
    B, T = positions.shape
    seen_old = torch.arange(S, device=positions.device) < positions[:, :1].unsqueeze(-1)  # (B, 1, S)
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()  # (T, T)
    return torch.cat([seen_old.expand(B, T, S), causal.expand(B, T, T)], -1).unsqueeze(2)


def decode_graph(unpack, d: _Shape, flats, h, positions, c_alloc, r_alloc, cached: torch.Tensor, last_only: bool):
    """The decode forward as a pure function (what torch.compile traces).

    unpack(flats): the weights by state-dict name (PackedWeights); h (B, T, H) embeddings of the step's
    tokens at positions (B, T) = lengths[b] + t, lengths the tokens already cached per row;
    c_alloc (2L * R, max_len, kv), r_alloc (2L * R, max_len, rope) the whole cache allocation of
    R >= B rows with its sublayer and row dims merged (`_allocation`: R and max_len are then plain
    sizes, dynamic from the first call, where a view of B rows would carry R in a stride and
    recompile when R changes), of which rows 0..B-1 and the first S = max(lengths) positions are
    read; S comes in as the length of `cached` (`_length_marker`), also dynamic from the first call.
    Returns logits (B, 1 or T, V), pre-norm hidden (B, T, H), the new keys of every sublayer,
    c_kv (2L, B, T, kv) and k_rope (2L, B, T, rope), and for LSA models the input of each layer's
    first attention sublayer (L, B, T, H), from which the caller computes the indexer keys (in the
    graph, the indexer's rope trips a symbolic-stride check of inductor in torch 2.13), else None.
    """
    W = unpack(flats)
    S, B = cached.shape[0], h.shape[0]
    R = c_alloc.shape[0] // (2 * d.layers)  # rows of the allocation
    # sublayer j's first B rows and S positions, (B, S, .): sliced, never reshaped (a reshape would
    # make R a size, specialised by torch.compile when it is 1)
    c_old = [c_alloc[j * R : j * R + B, :S] for j in range(2 * d.layers)]
    r_old = [r_alloc[j * R : j * R + B, :S] for j in range(2 * d.layers)]
    cos, sin = _rotary(W["rotary.inv_freq"], positions, d, h.dtype)
    visible = _visible(positions, S)  # (B, T, 1, S + T)
    new_c, new_r, index_inputs = [], [], []
    for i in range(d.layers):
        p = f"layers.{i}."
        x = _norm(h, W[p + "input_layernorm.0.weight"], d.norm_eps)
        if d.indexer:
            index_inputs.append(x)  # the LSA indexer's keys are computed from it outside the graph
        a, c, r = _attention(W, p + "self_attn.0.", d, x, cos, sin, c_old[2 * i], r_old[2 * i], visible)
        new_c.append(c)
        new_r.append(r)
        h = h + a
        u = _norm(h, W[p + "post_attention_layernorm.0.weight"], d.norm_eps)
        moe_out = _moe(W, p + "mlp.", d, u)  # joins at the end of the layer, as in the model
        h = h + _mlp(W, p + "mlps.0.", u)
        x = _norm(h, W[p + "input_layernorm.1.weight"], d.norm_eps)
        a, c, r = _attention(W, p + "self_attn.1.", d, x, cos, sin, c_old[2 * i + 1], r_old[2 * i + 1], visible)
        new_c.append(c)
        new_r.append(r)
        h = h + a
        h = h + _mlp(W, p + "mlps.1.", _norm(h, W[p + "post_attention_layernorm.1.weight"], d.norm_eps)) + moe_out
    normed = _norm(h[:, -1:] if last_only else h, W["norm.weight"], d.norm_eps)
    logits = _linear(normed, W["lm_head.weight"])
    return logits, h, torch.stack(new_c), torch.stack(new_r), torch.stack(index_inputs) if index_inputs else None


def mtp_graph(unpack, d: _Shape, flats, emb, prev, positions, c_cache, r_cache, cached: torch.Tensor):
    """One MTP head (MTPLayer.forward over the cache) as a pure function. unpack(flats): the head's
    own tensors (names without the "mtp.<i>." prefix) and rotary.inv_freq; emb, prev (B, T, H);
    c_cache (B, max_len, kv), r_cache (B, max_len, rope) its cache sublayer, of which the first
    S = len(cached) positions are read. -> hidden, normed hidden, new keys."""
    W = unpack(flats)
    S = cached.shape[0]
    c_old, r_old = c_cache[:, :S], r_cache[:, :S]
    cos, sin = _rotary(W["rotary.inv_freq"], positions, d, emb.dtype)
    visible = _visible(positions, S)
    x = torch.cat([_norm(emb, W["enorm.weight"], d.norm_eps), _norm(prev, W["hnorm.weight"], d.norm_eps)], dim=-1)
    h = _linear(x, W["eh_proj.weight"])
    a, c, r = _attention(W, "self_attn.", d, _norm(h, W["input_layernorm.weight"], d.norm_eps), cos, sin,
                         c_old, r_old, visible)
    h = h + a
    h = h + _mlp(W, "mlp.", _norm(h, W["post_attention_layernorm.weight"], d.norm_eps))
    return h, _norm(h, W["final_layernorm.weight"], d.norm_eps), c, r


def head_graph(unpack, flats, normed: torch.Tensor) -> torch.Tensor:
    """The output head (B, ..., H) -> logits, as the draft heads use it."""
    return _linear(normed, unpack(flats)["lm_head.weight"])


class CompiledDecoder:
    """FastDecoder's interface (forward, mtp) with the decode forward compiled into one graph.

    Reads the model's own parameters on every call: they are re-pointed into flat buffers
    (PackedWeights; no copies, in-place weight updates are seen, re-allocated ones are re-packed
    by prepare(), which the engine calls before each generation).
    Precondition, as the engine calls it: each row's positions are consecutive, starting at the
    number of tokens that row has cached.
    """

    def __init__(self, model: LongCatForCausalLM) -> None:
        self.model = model
        self.config = model.config
        self.fallback = FastDecoder(model)
        self.failed: str | None = None  # why compilation failed, once it has
        # graphs: batch 1 or more, 1 or more tokens per row, last-only logits or all, reductions or GEMMs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if next(model.parameters()).device.type == "cpu":
            kernels.rows_linear_enabled()  # built before tracing (once per machine); warns if it cannot be
        self.packed = PackedWeights(model)
        self._build()

    def _build(self) -> None:
        """The compiled graphs over the current flat buffers (torch.compile traces on first call)."""
        model, packed, shape = self.model, self.packed, _Shape.of(self.model)
        main = {n: n for n in packed.where if not n.startswith(NOT_IN_DECODE_GRAPH)}
        self._graph = self._compile(functools.partial(decode_graph, packed.unpacker(main), shape))
        self._mtp = []  # per MTP depth, its compiled graph
        for i in range(len(model.mtp)):
            prefix = f"mtp.{i}."
            names = {n[len(prefix):]: n for n in packed.where if n.startswith(prefix)}
            names["rotary.inv_freq"] = "rotary.inv_freq"
            self._mtp.append(self._compile(functools.partial(mtp_graph, packed.unpacker(names), shape)))
        self._head = self._compile(functools.partial(head_graph, packed.unpacker({"lm_head.weight": "lm_head.weight"})))

    def prepare(self) -> None:
        """Called before each generation: if the model's tensors were re-allocated since they were
        packed (.to(), .data =, ...), pack them again so the graphs read the current weights."""
        if not self.packed.current():
            self.packed.pack()
            self._build()

    @staticmethod
    def _compile(fn):
        # Sizes are static unless marked: the cache length and allocation are marked dynamic from
        # the first call (_length_marker, _allocation), batch rows static (one graph per bucket);
        # anything else that changes becomes symbolic after the change (automatic dynamic shapes).
        # The weights' shapes stay constants: cheap guards and constant loop bounds in the code.
        return torch.compile(fn, dynamic=None, fullgraph=True, options=dict(INDUCTOR_OPTIONS))

    def _failed(self, error: Exception) -> None:
        self.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"torch.compile of the decode step failed ({self.failed}); decoding without it",
                      RuntimeWarning, stacklevel=3)

    @staticmethod
    def cache_rows(batch: int) -> int:
        """Rows a cache for `batch` sequences should have, so that steps can run padded to a bucket."""
        return row_bucket(batch)

    @staticmethod
    def rows_for(batch: int, cache: LatentCache) -> int:
        """The padded batch a step of `batch` rows runs as: its bucket, when the cache's allocation
        has that many rows (the engine allocates them: Engine.cache_for), else the batch itself."""
        rows = row_bucket(batch)
        return rows if rows <= cache.allocated_rows else batch

    def _applies(self, ids: torch.Tensor, top: int) -> bool:
        if self.failed is not None or ids.numel() > MAX_ROWS:
            return False
        c = self.config
        # LSA selection is data-dependent: once a context outgrows index_topk, decode eagerly
        return not (c.lsa_enabled and self.model.lsa_mode == "sparse" and top > c.index_topk)

    def forward(self, ids, positions, cache: LatentCache, history=None, *, last_only: bool = True):
        """ids, positions (B, T) -> (logits (B, 1 or T, V), pre-norm hidden (B, T, H))."""
        model = self.model
        cache.begin(positions)  # checks the capacity; span = max position + 1
        if not self._applies(ids, cache._span):
            return self.fallback.forward(ids, positions, cache, history, last_only=last_only)
        B, T = ids.shape
        S = cache._span - T  # the longest row's cached length
        n_sub = 2 * self.config.num_layers
        h = model.embed(ids, history)
        rows = self.rows_for(B, cache)
        try:
            logits, hidden, new_c, new_r, keys = self._graph(*self.graph_inputs(h, positions, cache, S, rows), last_only)
        except Exception as error:  # noqa: BLE001 - any compiler failure: decode eagerly instead
            self._failed(error)
            return self.fallback.forward(ids, positions, cache, history, last_only=last_only)
        logits, hidden, new_c, new_r = logits[:B], hidden[:B], new_c[:, :B], new_r[:, :B]
        at = torch.arange(B, device=ids.device).unsqueeze(1).expand(B, T)
        cache.c_kv[:n_sub, at, positions] = new_c.to(cache.c_kv.dtype)
        cache.k_rope[:n_sub, at, positions] = new_r.to(cache.k_rope.dtype)
        if keys is not None:  # LSA: the indexer keys of the new tokens, from each layer's normed input
            keys = keys[:, :B]
            cos, sin = model.rotary(positions, h.dtype)
            for i, layer in enumerate(model.layers):
                key = layer.self_attn[0].indexer.keys(keys[i], cos, sin)
                cache.index_k[i, at, positions] = key.to(cache.index_k.dtype)
        return logits, hidden

    def graph_inputs(self, h, positions, cache: LatentCache, cached: int, rows: int) -> tuple:
        """decode_graph's inputs after `unpack, d` and before `last_only`: the flat weights, the
        step's embeddings and positions padded to `rows`, the cache allocation, its length `cached`."""
        n_sub = 2 * self.config.num_layers
        return (self.packed.flats, *_static_rows(_pad(h, rows), _pad(positions, rows), dims=(0, 0)),
                _allocation(cache.c_kv[:n_sub], cache.allocated_rows),
                _allocation(cache.k_rope[:n_sub], cache.allocated_rows), _length_marker(cached))

    def mtp(self, depth: int, emb, prev, positions, cache: LatentCache):
        """MTP head `depth` (1-based) over its cache sublayer, positions (B, T) consecutive from the
        first not yet cached -> (hidden, normed hidden), as FastDecoder.mtp."""
        cache.begin(positions)
        if self.failed is not None or emb.shape[0] * emb.shape[1] > MAX_ROWS:
            return self.fallback.mtp(depth, emb, prev, positions, cache)
        graph = self._mtp[depth - 1]
        sub = self.model.mtp[depth - 1].sublayer
        B, T = positions.shape
        S = cache._span - T
        rows = self.rows_for(B, cache)
        c_cache, r_cache = _widened(cache.c_kv[sub], 0, rows), _widened(cache.k_rope[sub], 0, rows)
        try:
            h, normed, c, r = graph(self.packed.flats,
                                    *_static_rows(_pad(emb, rows), _pad(prev, rows), _pad(positions, rows), dims=(0, 0, 0)),
                                    *_cache_inputs(c_cache, r_cache, row_dim=0), _length_marker(S))
        except Exception as error:  # noqa: BLE001
            self._failed(error)
            return self.fallback.mtp(depth, emb, prev, positions, cache)
        at = torch.arange(B, device=positions.device).unsqueeze(1).expand(B, T)
        cache.c_kv[sub, at, positions] = c[:B].to(cache.c_kv.dtype)
        cache.k_rope[sub, at, positions] = r[:B].to(cache.k_rope.dtype)
        return h[:B], normed[:B]

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The output head for draft tokens (B, H) -> (B, V)."""
        B = normed.shape[0]
        if self.failed is None and B <= MAX_ROWS:
            try:
                (padded,) = _static_rows(_pad(normed, row_bucket(B)), dims=(0,))
                return self._head(self.packed.flats, padded)[:B]
            except Exception as error:  # noqa: BLE001
                self._failed(error)
        return self.model.lm_head(normed)


_ONE = torch.zeros(1)


def _length_marker(length: int) -> torch.Tensor:
    """A tensor of `length` elements (a stride-0 view: nothing allocated) whose size is dynamic from
    the first call. Passed as an int, the cache length would be a constant in the first graph and
    a symbol only from the second step on: every graph would compile twice (tens of seconds each)."""
    marker = _ONE.expand(length)
    torch._dynamo.maybe_mark_dynamic(marker, 0)
    return marker


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with its first dim padded to `rows` by repeating its first row (valid positions, finite
    values; the padded rows' results are dropped)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


def _widened(store: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    """`store` (rows 0.. of the cache allocation along `dim`) as a view of `rows` rows; the
    allocation has them (LatentCache.allocated_rows). The added rows are only read, by padded rows
    whose results are dropped."""
    if store.shape[dim] == rows:
        return store
    size = list(store.shape)
    size[dim] = rows
    return store.as_strided(size, store.stride(), store.storage_offset())


def _static_rows(*tensors: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Marks each tensor's row dim static: a batch of another size compiles its own graph (one per
    bucket) rather than turning the row count into a symbol in the existing one."""
    for t, d in zip(tensors, dims):
        torch._dynamo.mark_static(t, d)
    return tensors


def _cache_inputs(*stores: torch.Tensor, row_dim: int) -> tuple[torch.Tensor, ...]:
    """One cache sublayer's rows as graph inputs: rows static (one graph per bucket), the allocated
    length (the dim after the rows) dynamic from the first call, so that a cache grown for a longer
    generation reuses the graphs instead of compiling them again."""
    for t in stores:
        torch._dynamo.mark_static(t, row_dim)
        torch._dynamo.maybe_mark_dynamic(t, row_dim + 1)
    return stores


def _allocation(store: torch.Tensor, rows: int) -> torch.Tensor:
    """`store` (sublayers, rows 0.., max_len, d), a view of the cache allocation, widened to all its
    `rows` and viewed with the sublayer and row dims merged: (sublayers * rows, max_len, d), both
    sizes dynamic from the first call. Any view of fewer rows has the allocation's row count in its
    sublayer stride, and a new count (the engine grows its cache for a larger batch) would recompile."""
    merged = _widened(store, 1, rows).view(store.shape[0] * rows, *store.shape[2:])  # a view: never a copy
    torch._dynamo.maybe_mark_dynamic(merged, 0)
    torch._dynamo.maybe_mark_dynamic(merged, 1)
    return merged


__all__ = ["CompiledDecoder", "PackedWeights", "decode_graph", "mtp_graph", "row_bucket", "REDUCTION_ROWS", "MAX_ROWS",
           "ROW_BUCKETS", "NOT_IN_DECODE_GRAPH"]
