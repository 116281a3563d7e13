"""Serving cost model: weights and KV cache per device, the longest context that fits, and
bandwidth lower bounds on decode and prefill.

Deployment shape (the DeepSeek/LongCat way of serving MoE): the routed experts and the n-gram
tables spread over all chips (`ep`, default every chip), the dense part (attention, dense FFNs,
embeddings, MTP heads) is split over `tp` chips and replicated in chips/tp attention groups.
MLA caches one latent per token that every TP rank of a group needs whole; GQA splits its KV heads.

In the shared layout vocabulary (`longcat.parallel.ParallelLayout`) the attention groups are the
data-parallel ranks: `dp_shard=chips/tp,ep=ep,tp=tp`. The runtime takes expert-parallel ranks
from dp_shard only, so that string exists when ep divides chips/tp; the default `ep` = every chip
also spreads experts over the TP ranks of a group, which serving engines do and the runtime does
not (the result then says so instead of giving a string).

Two context figures: `max_context_tokens` shards one sequence's KV over every attention group
(context-parallel decoding, as long-context servers do), `max_context_tokens_per_group` keeps it in
one group.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .arch import Architecture
from .engines import KV_DTYPES, kv_layout, load_engine, mtp_cached, paged_tokens
from .hardware import Hardware

GiB = 2**30
DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0 + 4.0 / (128 * 128)}  # fp8: one fp32 scale per 128x128 block


@dataclass
class ServeSetup:
    arch: Architecture
    hw: Hardware
    chips: int
    tp: int = 0  # 0: the largest power of two <= 8 dividing the heads and the chips
    ep: int = 0  # 0: every chip
    weights_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    mem_fraction: float = 0.0  # share of HBM the server may use (0: the engine's default)
    batch: int = 1  # sequences decoded together (for the decode bound)
    context: int = 1 << 20  # target context for the bounds and for chips_for_context
    engine: str = "sglang"  # memory layout: a name in longcat/catalog/engines/
    mtp: bool | None = None  # MTP layers hold a cache (None: the engine's default)
    max_running: int = 0  # requests decoded together, for the workspace (0: the engine's default)
    prefill_chunk: int = 0  # tokens per prefill forward (0: the engine's default)

    def resolved(self) -> "ServeSetup":
        a = self.arch
        if self.weights_dtype not in DTYPE_BYTES:
            raise ConfigError(f"--weights-dtype must be one of {', '.join(DTYPE_BYTES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}")
        engine = load_engine(self.engine)
        if self.chips < 1:
            raise ConfigError("--chips must be >= 1")
        if not 0 <= self.mem_fraction <= 1:
            raise ConfigError(f"--mem-fraction must be in (0, 1], got {self.mem_fraction}")
        for name in ("max_running", "prefill_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (0: the engine's default)")
        tp = self.tp or max(t for t in (1, 2, 4, 8) if a.num_heads % t == 0 and self.chips % t == 0 and t <= self.chips)
        if a.num_heads % tp or self.chips % tp:
            raise ConfigError(f"--tp {tp} must divide the {a.num_heads} heads and --chips {self.chips}")
        ep = self.ep or self.chips
        if ep > self.chips or self.chips % ep:
            raise ConfigError(f"--ep {ep} must divide --chips {self.chips}")
        return dataclasses.replace(self, tp=tp, ep=ep, mem_fraction=self.mem_fraction or engine.mem_fraction,
                                   max_running=self.max_running or engine.max_running,
                                   prefill_chunk=self.prefill_chunk or engine.prefill_chunk)


def serve_plan(setup: ServeSetup) -> dict[str, Any]:
    s = setup.resolved()
    a, hw = s.arch, s.hw
    engine = load_engine(s.engine)
    p = a.param_counts()
    w = DTYPE_BYTES[s.weights_dtype]
    expert_gemm = a.ffn_params(a.expert_ffn_hidden_size) if a.is_moe else 0
    routed = a.moe_layers * a.n_routed_experts * expert_gemm
    if a.mtp_ffn == "moe" and a.is_moe:
        routed += a.mtp_layers * a.n_routed_experts * expert_gemm
    tables = p["embedding"] + a.ngram_table_params  # looked up, kept in bf16
    dense = sum(p.values()) - routed - tables
    experts_per_device = math.ceil(a.n_routed_experts / s.ep) if a.is_moe else 0
    expert_bytes = (routed / max(1, a.n_routed_experts)) * experts_per_device * w
    dense_bytes = dense / s.tp * w + p["embedding"] / s.tp * 2
    table_bytes = a.ngram_table_params / s.chips * 2
    weights = dense_bytes + expert_bytes + table_bytes
    groups = s.chips // s.tp
    workspace = _workspace(s, groups)
    reserve = (hw.reserved_gib + engine.runtime_reserve_gib) * GiB
    hbm = hw.hbm_gib * GiB
    problems = []
    if engine.workspace_in_fraction:
        # one budget (vLLM's gpu-memory-utilization, our engine): runtime, activations, weights and KV
        usable = hbm * s.mem_fraction - reserve
        free = usable - weights - workspace["total"]
    else:
        # SGLang: the static pool holds weights and KV; runtime and activations must fit in the rest
        usable = hbm * s.mem_fraction
        free = usable - weights
        outside = hbm * (1 - s.mem_fraction) - reserve
        if workspace["total"] > outside:
            problems.append(f"the activation workspace ({workspace['total'] / GiB:.1f} GiB for a {s.prefill_chunk:,}-token "
                            f"prefill chunk or {s.max_running} decoding requests) and the runtime ({reserve / GiB:.1f} GiB) "
                            f"exceed the {hbm * (1 - s.mem_fraction) / GiB:.1f} GiB outside --mem-fraction "
                            f"{s.mem_fraction:g}: lower --mem-fraction, --prefill-chunk or --max-running")
    mtp = mtp_cached(a, engine, s.mtp)
    layout = kv_layout(a, engine, s.kv_dtype, tp=s.tp, mtp=mtp)
    kv_dev = layout["total"]
    tokens_fit = max(0, int(free // kv_dev)) if free > 0 else 0
    page = engine.page_tokens
    if page > 1:
        per_group = tokens_fit // page * page  # whole pages
    else:
        per_group = tokens_fit
    # requests of --context tokens held at once in one group: pages round each request up; our
    # engine reserves a max_len (= context) row per request
    at_context = per_group // paged_tokens(s.context, page) if s.context else 0
    out: dict[str, Any] = {
        "model": a.name, "hardware": hw.name, "engine": engine.name, "chips": s.chips, "tp": s.tp, "ep": s.ep,
        "attention_groups": groups, "weights_dtype": s.weights_dtype, "kv_dtype": s.kv_dtype,
        "mem_fraction": s.mem_fraction,
        "weights_gib_per_device": weights / GiB,
        "weights_breakdown_gib": {"dense": dense_bytes / GiB, "experts": expert_bytes / GiB, "ngram_tables": table_bytes / GiB},
        "experts_per_device": experts_per_device,
        "usable_gib_per_device": usable / GiB,
        "runtime_reserved_gib": reserve / GiB,
        "workspace_gib_per_device": {k: v / GiB for k, v in workspace.items()},
        "workspace_in_fraction": engine.workspace_in_fraction,
        "free_gib_per_device": free / GiB,
        "fits": free > 0 and not problems,
        "problems": problems,
        "mtp_cache": mtp,
        "kv_bytes_per_token": kv_dev,
        "kv_layout_bytes_per_token": layout,
        "kv_bytes_per_token_total": kv_layout(a, engine, s.kv_dtype, tp=1, mtp=mtp)["total"],
        "page_tokens": page,
        "max_context_tokens": per_group * groups,
        "max_context_tokens_per_group": per_group,
        "requests_at_context_per_group": at_context,
        "max_running": s.max_running, "prefill_chunk": s.prefill_chunk,
    }
    out.update(_bounds(s, dense_bytes, expert_bytes, kv_dev, groups))
    out.update(_runtime(s, groups))
    return out


def _workspace(s: ServeSetup, groups: int) -> dict[str, float]:
    """Activation memory of the largest forward on one device (bytes): a prefill chunk or a decode
    batch. Between layers only the residual stream lives; inside one, the largest sublayer's
    intermediates: MLA prefill expands the chunk's keys and values per head (heads split over tp),
    a dense FFN its gate/up/product (split over tp), the MoE the rows dispatched to this device
    (every group's chunk, `slots` rows per token over `ep` devices) with their expert intermediates.
    A decode batch holds fp32 logits over the whole vocabulary for every running request."""
    a = s.arch
    T, H, tp = s.prefill_chunk, a.hidden_size, s.tp
    residual = 3 * T * H * 2  # hidden state, norm output, sublayer output (bf16)
    heads = a.num_heads / tp
    attention = T * heads * (2 * a.qk_dim + a.v_dim) * 2  # q, expanded k and v of the chunk
    attention += T * heads * a.v_dim * 2  # attention output before o_proj
    ffn = T * 3 * a.ffn_hidden_size / tp * 2 if a.ffn_hidden_size else 0.0
    moe = 0.0
    if a.is_moe:
        rows = T * groups * a.slots / s.ep
        moe = rows * (H * 1 + H / 128 * 4 + 3 * a.expert_ffn_hidden_size * 2 + H * 2)  # fp8 rows in, bf16 out
    prefill = residual + max(attention, ffn, moe)
    decode = s.max_running * (a.vocab_size * 4 + 3 * H * 2)
    return {"prefill": prefill, "decode": decode, "total": max(prefill, decode)}


def _runtime(s: ServeSetup, groups: int) -> dict[str, Any]:
    """The deployment in the runtime's vocabulary, or why it has none."""
    from ..parallel.layout import ParallelLayout

    a = s.arch
    ep = s.ep if a.is_moe else 1
    rejected = []
    if ep > 1 and groups % ep:
        rejected.append(f"ep={ep} spreads experts over the TP ranks too; the runtime takes ep from "
                        f"dp_shard=chips/tp={groups}, so ep must divide {groups} (--ep {groups}, or --tp 1)")
    if ep > 1 and a.n_routed_experts % ep:
        rejected.append(f"ep={ep} must divide the {a.n_routed_experts} routed experts")
    if s.tp > 1 and a.ffn_hidden_size % s.tp:
        rejected.append(f"tp={s.tp} must divide ffn_hidden_size={a.ffn_hidden_size}")
    parallel = None if rejected else str(ParallelLayout(dp_shard=groups, ep=ep, tp=s.tp))
    return {"parallel": parallel, "parallel_rejected": rejected}


def _bounds(s: ServeSetup, dense_bytes: float, expert_bytes: float, kv_dev: float, groups: int) -> dict[str, Any]:
    """Lower bounds at full HBM bandwidth and peak FLOP/s (no efficiency factor: bounds, not estimates)."""
    a, hw = s.arch, s.hw
    bw = hw.hbm_bandwidth_gbs * 1e9
    # each decode step reads the dense weights, the experts its tokens touch, and the KV of each sequence
    if a.is_moe:
        touched = 1 - (1 - a.slots / a.n_routed_experts) ** s.batch  # share of local experts a step touches
    else:
        touched = 0.0
    kv_read = s.batch * s.context * kv_dev / groups  # the sequences' KV spread evenly over the groups
    decode = (dense_bytes + expert_bytes * touched + kv_read) / bw
    flops = sum(a.flops_per_token(s.context, causal=True, training=False).values()) * s.context
    prefill = flops / (s.chips * hw.peak_tflops_bf16 * 1e12)
    return {
        "context": s.context, "batch": s.batch,
        "decode_step_lower_bound_s": decode,
        "decode_tokens_per_s_upper_bound": s.batch / decode if decode else float("inf"),
        "prefill_lower_bound_s": prefill,
    }


def chips_for_context(setup: ServeSetup, context: int, *, per_group: bool = False, limit: int = 1 << 20) -> int | None:
    """The fewest chips (multiples of tp, experts over all chips) whose KV room holds `context` tokens."""
    tp = setup.tp or 8
    while setup.arch.num_heads % tp:
        tp //= 2
    key = "max_context_tokens_per_group" if per_group else "max_context_tokens"

    def ok(n: int) -> bool:
        trial = dataclasses.replace(setup, chips=n, tp=tp, ep=0, context=context)
        return serve_plan(trial)[key] >= context

    lo, hi = 1, 1
    while not ok(hi * tp):
        hi *= 2
        if hi * tp > limit:
            return None
    while lo < hi:  # capacity grows with chips: smallest multiple of tp that fits
        mid = (lo + hi) // 2
        if ok(mid * tp):
            hi = mid
        else:
            lo = mid + 1
    return hi * tp


__all__ = ["ServeSetup", "serve_plan", "chips_for_context", "DTYPE_BYTES"]
