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

import math
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .arch import Architecture
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
    mem_fraction: float = 0.9  # share of HBM the server may use
    batch: int = 1  # sequences decoded together (for the decode bound)
    context: int = 1 << 20  # target context for the bounds and for chips_for_context

    def resolved(self) -> "ServeSetup":
        a = self.arch
        for name in ("weights_dtype", "kv_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPE_BYTES)}")
        if self.chips < 1:
            raise ConfigError("--chips must be >= 1")
        if not 0 < self.mem_fraction <= 1:
            raise ConfigError(f"--mem-fraction must be in (0, 1], got {self.mem_fraction}")
        tp = self.tp or max(t for t in (1, 2, 4, 8) if a.num_heads % t == 0 and self.chips % t == 0 and t <= self.chips)
        if a.num_heads % tp or self.chips % tp:
            raise ConfigError(f"--tp {tp} must divide the {a.num_heads} heads and --chips {self.chips}")
        ep = self.ep or self.chips
        if ep > self.chips or self.chips % ep:
            raise ConfigError(f"--ep {ep} must divide --chips {self.chips}")
        return ServeSetup(a, self.hw, self.chips, tp, ep, self.weights_dtype, self.kv_dtype, self.mem_fraction, self.batch, self.context)


def serve_plan(setup: ServeSetup) -> dict[str, Any]:
    s = setup.resolved()
    a, hw = s.arch, s.hw
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
    usable = hw.hbm_gib * GiB * s.mem_fraction - hw.reserved_gib * GiB
    free = usable - weights
    kv_dev = a.kv_bytes_per_token(DTYPE_BYTES[s.kv_dtype], tp=s.tp)
    groups = s.chips // s.tp
    per_group = max(0, int(free // kv_dev)) if free > 0 else 0
    out: dict[str, Any] = {
        "model": a.name, "hardware": hw.name, "chips": s.chips, "tp": s.tp, "ep": s.ep,
        "attention_groups": groups, "weights_dtype": s.weights_dtype, "kv_dtype": s.kv_dtype,
        "weights_gib_per_device": weights / GiB,
        "weights_breakdown_gib": {"dense": dense_bytes / GiB, "experts": expert_bytes / GiB, "ngram_tables": table_bytes / GiB},
        "experts_per_device": experts_per_device,
        "usable_gib_per_device": usable / GiB,
        "free_gib_per_device": free / GiB,
        "fits": free > 0,
        "kv_bytes_per_token": kv_dev,
        "kv_bytes_per_token_total": a.kv_bytes_per_token(DTYPE_BYTES[s.kv_dtype]),
        "max_context_tokens": per_group * groups,
        "max_context_tokens_per_group": per_group,
    }
    out.update(_bounds(s, dense_bytes, expert_bytes, kv_dev, groups))
    out.update(_runtime(s, groups))
    return out


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
        trial = ServeSetup(setup.arch, setup.hw, n, tp, 0, setup.weights_dtype, setup.kv_dtype, setup.mem_fraction, setup.batch, context)
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
