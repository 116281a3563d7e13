"""Training cost model: memory per device, step time, MFU, days, checkpoints and failures.

Everything is arithmetic on an `Architecture`, a `Hardware` entry, a software `Stack` and a
`Layout`; nothing is fitted per model. The formulas (DESIGN §5, docs/PLANNER.md):

- FLOPs: each matrix parameter a token touches costs 2 FLOPs forward and 4 backward; attention
  adds 2*keys*heads*(d_qk+d_v) per sublayer and token (keys = S/2 causal, S non-causal, capped by
  the sparse budget), plus the indexer scoring every past key. Recomputation repeats the forward.
- Compute time: GEMM FLOPs at gemm_efficiency of peak, attention at attention_efficiency,
  element-wise traffic (norms, activations, softmax, permutes) at memory_efficiency of HBM
  bandwidth, plus a launch overhead per kernel.
- Communication: ring collectives move 2(n-1)/n * S (all-reduce) or (n-1)/n * S (gather or
  scatter) per chip at the group's bandwidth (`Hardware.group_bandwidth`) plus a fixed latency.
  TP collectives are exposed (minus Stack.tp_overlap); the expert all-to-all of a shortcut
  (ScMoE) block hides behind the block's dense work; context-parallel K/V exchange hides behind
  attention; DP gradient reduction hides behind the last backward when the stack overlaps it.
- Pipeline: step = (m + (p-1)/v) * slowest stage micro-batch time (1F1B bubble (p-1)/m,
  interleaved (p-1)/(v*m)).
- Memory: weights, gradients and optimizer state by ZeRO stage; activations by
  `Architecture.layer_tensors` under the recompute policy, times the micro-batches in flight on
  the first stage (p for 1F1B, p + (p-1)/v interleaved, m for GPipe); logits on the last stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..config import ConfigError
from .arch import Architecture
from .hardware import Hardware, Stack
from ..parallel.layout import ParallelLayout
from .layout import EP_SCHEDULES, RECOMPUTE, SCHEDULES, Layout, normalize_fixed, split_dp

GiB = 2**30
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("bf16", "fp8", "autocast")
# Kernels launched per forward of one part (eager PyTorch / Megatron without CUDA graphs). Only
# matters where the per-kernel overhead is large against the work (small models, CPUs).
KERNELS = {"attention": 14, "indexer": 10, "ffn": 6, "moe": 22, "norm_residual": 4}
# The fused chunked cross-entropy (Stack.loss_block_bytes > 0, longcat.model.cross_entropy) does
# the loss's forward and backward element-wise work in the forward, block by block, per logit:
# cast the bf16 product to fp32 (6 B), log-sum-exp (two reads: 8), subtract it and exponentiate in
# place (8 + 8), scale (8), cast the gradient to bf16 (6). The unfused loss moves ~14 B per logit
# forward (upcast, log-softmax, gather) and twice that backward.
FUSED_LOSS_BYTES_PER_LOGIT = 44.0
UNFUSED_LOSS_BYTES_PER_LOGIT = 14.0
# Eager ops per block of the fused loss (three GEMMs, casts, log-sum-exp, gather, the in-place
# softmax-gradient chain, the row copy and the weight-gradient accumulation).
FUSED_LOSS_OPS_PER_BLOCK = 19


@dataclass
class TrainSetup:
    arch: Architecture
    hw: Hardware
    stack: Stack
    chips: int
    seq_len: int
    global_batch_tokens: float
    tokens: float = 0.0  # training budget (0: no days estimate)
    optimizer: str = "adamw"
    precision: str = "bf16"  # bf16 (fp32 master), fp8 (fp8 GEMMs, bf16 weights, fp32 master), autocast (fp32 weights)

    def validate(self) -> None:
        if self.chips < 1:
            raise ConfigError(f"--chips must be >= 1, got {self.chips}")
        if self.seq_len < 1:
            raise ConfigError(f"--seq-len must be >= 1, got {self.seq_len}")
        if self.global_batch_tokens < self.seq_len:
            raise ConfigError(f"--global-batch-tokens ({self.global_batch_tokens:g}) must hold at least one sequence of --seq-len {self.seq_len}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")

    @property
    def sequences(self) -> float:
        return self.global_batch_tokens / self.seq_len


@dataclass
class TrainPlan:
    layout: Layout
    fits: bool
    memory: dict[str, float]  # bytes per device on the fullest stage, by category
    memory_stage: str
    step: dict[str, float]  # seconds per step by category
    step_time_s: float
    microbatches: int
    global_batch_tokens: float
    chips_used: int
    tokens_per_s: float
    model_flops_per_token: float  # causal
    model_flops_per_token_noncausal: float
    hw_flops_per_token: float  # as executed, with recomputation
    peak_tflops: float
    peak_name: str
    stages: dict[str, int]
    checkpoint: dict[str, float]
    reliability: dict[str, float]
    tokens_budget: float
    problems: list[str] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)  # Planner.runtime: what `longcat train --parallel` runs

    # --- derived -------------------------------------------------------------------------------------
    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_s * 86400

    @property
    def days(self) -> float:
        return self.tokens_budget / self.tokens_per_day if self.tokens_budget else 0.0

    @property
    def tflops_per_device(self) -> float:
        return self.tokens_per_s * self.model_flops_per_token / self.chips_used / 1e12

    @property
    def hw_tflops_per_device(self) -> float:
        return self.tokens_per_s * self.hw_flops_per_token / self.chips_used / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_device / self.peak_tflops

    @property
    def mfu_noncausal(self) -> float:
        return self.tokens_per_s * self.model_flops_per_token_noncausal / self.chips_used / 1e12 / self.peak_tflops

    @property
    def memory_gib(self) -> dict[str, float]:
        out = {k: v / GiB for k, v in self.memory.items()}
        out["total"] = sum(self.memory.values()) / GiB
        return out

    def to_dict(self) -> dict[str, Any]:
        days = self.days
        goodput = self.reliability.get("goodput", 1.0)
        return {
            "layout": str(self.layout),
            "parallel": self.runtime.get("parallel"),
            "runtime": self.runtime,
            "layout_fields": self.layout.to_dict(),
            "fits": self.fits,
            "problems": self.problems,
            "chips_used": self.chips_used,
            "memory_gib": {k: round(v, 3) for k, v in self.memory_gib.items()},
            "memory_stage": self.memory_stage,
            "stages": self.stages,
            "step_time_s": self.step_time_s,
            "step_breakdown_s": self.step,
            "microbatches": self.microbatches,
            "global_batch_tokens": self.global_batch_tokens,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_day": self.tokens_per_day,
            "days": days,
            "days_with_failures": days / goodput if goodput > 0 else float("inf"),
            "accelerator_days": days * self.chips_used,
            "tflops_per_device": self.tflops_per_device,
            "hw_tflops_per_device": self.hw_tflops_per_device,
            "mfu": self.mfu,
            "mfu_noncausal": self.mfu_noncausal,
            "hfu": self.hw_tflops_per_device / self.peak_tflops,
            "mfu_denominator": f"{self.peak_name} dense peak, {self.peak_tflops:g} TFLOP/s per device",
            "model_flops_per_token": self.model_flops_per_token,
            "model_flops_per_token_noncausal": self.model_flops_per_token_noncausal,
            "hw_flops_per_token": self.hw_flops_per_token,
            "checkpoint": self.checkpoint,
            "reliability": self.reliability,
        }


# ------------------------------------------------------------------------------------------------------


def ring_bytes(kind: str, size: int, nbytes: float) -> float:
    """Bytes each rank sends in a ring collective over `size` ranks on a buffer of `nbytes`."""
    if size <= 1:
        return 0.0
    factor = 2 * (size - 1) / size if kind == "all_reduce" else (size - 1) / size
    return factor * nbytes


# Tensor memory a host allocator can retain around: everything the step allocates as tensors. The
# runtime (`reserved`) and the GEMM library's cache (`library`) are measured as resident memory already.
ALLOCATED_CATEGORIES = ("weights", "gradients", "optimizer", "ema", "activations", "pipeline_inflight", "logits",
                        "comm_buffers")


def allocator_retained(memory: dict[str, float], retention: float) -> float:
    """Bytes the allocator keeps resident beyond the live tensors at the peak: `retention` (the
    measured share, Hardware.allocator_retention) of the live tensor bytes in `memory`. glibc malloc
    serves nearly every tensor from its heap once its dynamic mmap threshold has grown (up to 32 MiB)
    and keeps the freed chunks between live ones resident (mallopt(3)), so at the step's peak the
    process holds the live tensors plus these holes."""
    return retention * sum(memory.get(k, 0.0) for k in ALLOCATED_CATEGORIES)


class Planner:
    """Evaluates layouts for one `TrainSetup`; per-layer quantities are cached across layouts."""

    def __init__(self, setup: TrainSetup) -> None:
        setup.validate()
        self.s = setup
        a = setup.arch
        self.params = a.param_counts()
        self.total_params = sum(self.params.values())
        H = a.hidden_size
        # matrix parameters a token touches per part of a block
        self.attn_gemm = [a.attention_params(with_indexer=i < a.indexers_per_layer) for i in range(a.attn_per_layer)]
        self.ffn_gemm = a.ffn_params(a.ffn_hidden_size)
        self.expert_gemm = a.ffn_params(a.expert_ffn_hidden_size) if a.is_moe else 0
        self.router_gemm = H * (a.n_routed_experts + a.zero_experts)
        # training FLOPs per token: x3 forward (model), executed attention and recompute (hardware)
        flash = setup.stack.flash_attention
        causal = a.flops_per_token(setup.seq_len, causal=True)
        full = a.flops_per_token(setup.seq_len, causal=False)
        self.causal = causal
        self.model_flops = 3 * sum(causal.values())
        self.model_flops_noncausal = 3 * sum(full.values())
        self.executed = causal if flash else full
        self.peak = setup.hw.peak_tflops(setup.precision)
        self.peak_name = "FP8" if setup.precision == "fp8" and setup.hw.peak_tflops_fp8 > 0 else "BF16"
        # parameter groups (counts, not bytes)
        p = self.params
        self.layer_dense_params = (p["attention"] + p["dense_ffn"] + p["router"] + p["norm"]
                                   + (p["experts"] - a.moe_layers * a.n_routed_experts * self.expert_gemm)) / a.num_layers
        self.layer_expert_params = a.moe_layers * a.n_routed_experts * self.expert_gemm / a.num_layers
        self.mtp_dense = a.mtp_layers * a.mtp_params(active=False)
        self.mtp_expert = 0.0
        if a.mtp_ffn == "moe" and a.is_moe:
            self.mtp_expert = a.mtp_layers * a.n_routed_experts * self.expert_gemm
            self.mtp_dense -= self.mtp_expert
        # share of parameters Muon updates (hidden matrices); embeddings, head, norms stay on AdamW
        non_matrix = p["embedding"] + p["lm_head"] + p["norm"] + a.ngram_table_params
        self.muon_share = max(0.0, 1 - non_matrix / self.total_params)
        # distinct linear-layer shapes one step runs: the GEMM library keeps a kernel per shape
        # (Hardware.library_cache_*). Every block has the same weight shapes; a routed expert's
        # exact row count differs by block and by step, so each expert of each MoE block is one
        # more (`gemm_shapes` replaces them by the bucketed sizes when the stack pads rows).
        attn_shapes = 5 if a.attention == "mla" else 4
        attn_shapes += 3 if a.index_heads else 0
        dense_shapes = attn_shapes + 3 + (3 if a.n_shared_experts else 0) + (1 if a.is_moe else 0) + 1 + (a.mtp_layers > 0)
        dense_shapes += 1 if a.ngram_proj_params else 0
        # each MTP depth d runs its block on S - d positions per sequence: its own row counts
        dense_shapes += a.mtp_layers * (attn_shapes + (3 if a.mtp_ffn == "dense" or not a.is_moe else 1))
        expert_layers = a.moe_layers + (a.mtp_layers if a.mtp_ffn == "moe" and a.is_moe else 0)
        self.dense_gemm_shapes = dense_shapes
        self.gemm_shapes = dense_shapes + 2 * a.n_routed_experts * expert_layers  # exact row counts
        self._bucket_cache: dict[tuple, tuple[float, int]] = {}
        self._layer_time_cache: dict[tuple, dict[str, float]] = {}
        self._extras_cache: dict[tuple, tuple[dict[str, float], dict[str, float]]] = {}

    def expert_buckets(self, L: Layout) -> tuple[float, int]:
        return self._expert_buckets(L.tp, L.cp, L.microbatch, L.ep)

    def _expert_buckets(self, tp: int, cp: int, b: int, ep: int) -> tuple[float, int]:
        """(padding share, distinct padded row counts) of the routed experts' grouped GEMMs on a
        stack that pads each expert's rows to bucketed counts (Stack.expert_row_buckets > 0).

        The router is assumed balanced, as everywhere in the planner: a local expert's rows are
        Poisson with mean mu = routed rows per device / local experts. The sizes counted are the
        buckets of mu +- 4 sigma (over thousands of expert-blocks per run the loads reach ~4 sigma);
        the padding is the expected gap to the bucket, over that distribution."""
        a, stack = self.s.arch, self.s.stack
        key = (tp, cp, b, ep)
        if key in self._bucket_cache:
            return self._bucket_cache[key]
        tokens = b * self.s.seq_len / cp / (tp if stack.sequence_parallel else 1)
        mu = tokens * a.slots * ep / a.n_routed_experts
        sigma = math.sqrt(mu)
        lo, hi = max(1, math.floor(mu - 4 * sigma)), max(1, math.ceil(mu + 4 * sigma))
        sizes, rows = set(), lo
        while rows <= hi:
            sizes.add(self._bucketed(rows))
            rows = self._bucketed(rows) + 1
        stride = max(1, (hi - lo) // 4000)
        weight = gap = 0.0
        for rows in range(lo, hi + 1, stride):
            w = math.exp(-0.5 * ((rows - mu) / sigma) ** 2) if sigma > 0 else 1.0
            weight += w
            gap += w * (self._bucketed(rows) - rows)
        result = (gap / weight / mu if mu > 0 else 0.0, len(sizes))
        self._bucket_cache[key] = result
        return result

    def _bucketed(self, rows: int) -> int:
        """`rows` rounded up to the stack's bucket (longcat.model.moe.bucketed_count for 8 and 16)."""
        stack = self.s.stack
        power = 1 << (rows.bit_length() - 1)
        grain = max(int(stack.expert_row_bucket_min), int(power / stack.expert_row_buckets))
        return -(-rows // grain) * grain

    def library_shapes(self, L: Layout) -> int:
        """Distinct GEMM shapes a step runs (see __init__): with bucketed expert rows, two (gate_up,
        down) per bucketed size, shared by every expert and block."""
        a, stack = self.s.arch, self.s.stack
        shapes = self.gemm_shapes
        if a.is_moe and stack.expert_row_buckets > 0:
            shapes = self.dense_gemm_shapes + 2 * self.expert_buckets(L)[1]
        if stack.loss_block_bytes > 0:
            # the fused loss runs its GEMMs on blocks: a full block and each head's last partial
            # one, in place of the heads' whole-batch GEMMs (one already counted)
            rows = self._loss_block_rows(L)
            sizes = {rows} | {n % rows for d in range(1 + a.mtp_layers)
                              if (n := L.microbatch * (self.s.seq_len - d) / L.cp) % rows}
            shapes += len(sizes) - 1
        return shapes

    # --- per-layer quantities ------------------------------------------------------------------------
    @lru_cache(maxsize=None)
    def _layer(self, moe: bool, tp: int, cp: int, b: int, mtp: bool = False) -> dict[str, float]:
        """Forward quantities of one block for one micro-batch on one device."""
        s, a, hw, stack = self.s, self.s.arch, self.s.hw, self.s.stack
        S = s.seq_len
        tokens = b * S / cp  # tokens each device of the TP group works on
        H = a.hidden_size
        sp = stack.sequence_parallel
        # Experts are whole on every TP rank (ep is taken from dp_shard, not from tp): with sequence
        # parallelism each TP rank routes its own 1/tp of the tokens, without it every TP rank
        # routes all of them and repeats the expert work.
        exp_div = tp if sp else 1
        flash = stack.flash_attention
        dense_plain, dense_moe = a.dense_ffns_in_layer
        if mtp:
            n_attn, n_ffn = 1, (0 if moe else 1)
            attn = [a.attention_params()]
            gemm_extra = 2 * H * H  # eh_proj
            core = a.mtp_attention_core_flops(S, causal=flash)
        else:
            n_attn, n_ffn = a.attn_per_layer, (dense_moe if moe else dense_plain)
            attn = self.attn_gemm
            gemm_extra = 0
            core = a.attention_core_flops(S, causal=flash)
        # LSA on a runtime without a sparse attention kernel: dense (masked) attention, fp32 indexer
        # products and (query, key)-sized selection tensors instead of `core`'s sparse budget
        lsa = a.lsa_dense_runtime(S) if a.index_heads and not stack.sparse_attention_kernel else None
        if lsa is not None:
            core = a.mtp_attention_core_flops(S, causal=flash, sparse=False) if mtp else lsa["causal_flops"]
            if mtp:
                lsa = None  # the MTP block attends densely, with no indexer
        routed_gemm = a.slots * self.expert_gemm if moe else 0.0
        moe_gemm = routed_gemm + (a.n_shared_experts * self.expert_gemm + self.router_gemm if moe else 0.0)
        gemm_params = sum(attn) + n_ffn * self.ffn_gemm + moe_gemm + gemm_extra
        replicated_gemm = routed_gemm + (self.router_gemm if moe else 0.0)
        gemm_flops = 2 * (gemm_params - replicated_gemm) * tokens / tp + 2 * replicated_gemm * tokens / exp_div
        expert_flops = 2 * routed_gemm * tokens / exp_div  # grouped GEMMs over the routed experts
        core_flops = core * tokens / tp
        # autocast keeps the residual stream (embedding output, norms, residual adds) in fp32
        # padded expert rows: the share as for one EP rank (the saved bytes barely depend on ep)
        padding = self._expert_buckets(tp, cp, b, 1)[0] if moe and a.is_moe and stack.expert_row_buckets > 0 else None
        t = a.layer_tensors(moe, S, flash=flash, mtp=mtp, residual_bytes=4 if s.precision == "autocast" else 2,
                            eager=stack.eager_autograd, fp8_cache=stack.fp8_activation_cache and s.precision == "fp8",
                            expert_padding=padding)
        traffic_scale = stack.elementwise_passes
        rep_div = tp if sp else 1
        saved = {k: v * tokens for k, v in t.saved.items()}
        traffic = {k: v * tokens for k, v in t.traffic.items()}
        saved_dev = (saved["rep"] / rep_div + (saved["par"] + saved["s2"] * (not flash)) / tp + saved["exp"] / exp_div
                     + saved["idx"] / rep_div)
        s2_dev = saved["s2"] * (not flash) / tp
        light_dev = t.light["rep"] * tokens / rep_div + t.light["par"] * tokens / tp  # dropped by recompute=norm_up
        traffic_dev = (traffic["rep"] / rep_div + (traffic["par"] + traffic["s2"] * (not flash)) / tp + traffic["exp"] / exp_div
                       + traffic["idx"] / rep_div)
        s2_traffic = traffic["s2"] * (not flash) / tp
        peak = self.peak * 1e12
        t_gemm = (gemm_flops - expert_flops) / (peak * hw.gemm_efficiency) + expert_flops / (peak * hw.expert_gemm_efficiency)
        t_core = core_flops / (s.hw.peak_tflops_bf16 * 1e12 * hw.attention_efficiency)
        t_mem = traffic_scale * traffic_dev / (hw.hbm_bandwidth_gbs * 1e9 * hw.memory_efficiency)
        kernels = n_attn * (KERNELS["attention"] + KERNELS["norm_residual"]) + n_ffn * (KERNELS["ffn"] + KERNELS["norm_residual"])
        if a.index_heads and not mtp:
            kernels += a.indexers_per_layer * KERNELS["indexer"]
        if moe:
            kernels += KERNELS["moe"]
        t_launch = kernels * hw.kernel_overhead_us * 1e-6
        t_lsa_fwd = t_lsa_bwd = 0.0
        if lsa is not None:
            rate = hw.hbm_bandwidth_gbs * 1e9 * hw.memory_efficiency
            t_masked = lsa["masked_flops"] * tokens / tp / (s.hw.peak_tflops_bf16 * 1e12 * hw.masked_attention_efficiency)
            t_core += t_masked
            core_flops += lsa["masked_flops"] * tokens / tp
            fp32 = hw.peak_tflops_fp32 * 1e12 * hw.gemm_efficiency
            t_index = lsa["index_flops"] * tokens / rep_div / fp32
            t_target = lsa["target_flops"] * tokens / tp / fp32
            t_lsa_fwd = t_index + t_target + lsa["traffic_fwd"] * tokens / rep_div / rate
            t_lsa_bwd = 2 * t_index + lsa["traffic_bwd"] * tokens / rep_div / rate
            saved_dev += lsa["saved"] * tokens / rep_div
        # share of the block's GEMM work that can hide a shortcut-MoE all-to-all (FFN0, Attn1, FFN1)
        hide_params = sum(attn[1:]) + n_ffn * self.ffn_gemm
        overlap_share = hide_params / gemm_params if (moe and a.moe_style == "shortcut") else 0.0
        fwd = t_gemm + t_core + t_mem + t_launch + t_lsa_fwd
        # backward: GEMMs and element-wise work twice the forward; a flash backward recomputes the
        # scores inside the kernel (5 matmuls against 2 forward)
        bwd = 2 * t_gemm + (2.5 if flash else 2.0) * t_core + 2 * t_mem + 2 * t_launch + t_lsa_bwd
        # communication volumes (bytes per device per pass)
        act_bytes = tokens * H * 2  # one (b, S/cp, H) bf16 tensor
        tp_collectives = n_attn + n_ffn + (a.n_shared_experts > 0 and moe and not sp)
        cp_bytes = 0.0
        if cp > 1:
            if a.attention == "mla":
                kv_token = (a.kv_lora_rank + a.qk_rope_head_dim) * 2
            else:
                kv_token = 2 * max(1, a.kv_heads // tp) * (a.qk_dim + a.v_dim)
            cp_bytes = n_attn * (cp - 1) / cp * b * S * kv_token
        a2a = 0.0
        if moe:
            a2a = 2 * tokens / exp_div * a.slots * H * 2  # dispatch + combine rows in bf16: the buffers
        # recompute=norm_up repeats the norms (element-wise) and the MLA up-projections (GEMMs)
        up_params = 0.0
        if a.attention == "mla":
            up_params = n_attn * a.num_heads * (a.q_lora_rank * a.qk_dim + a.kv_lora_rank * (a.qk_nope_head_dim + a.v_head_dim))
        norm_traffic = (n_attn + n_ffn + (moe and a.moe_style == "replace")) * 2 * 2 * H * tokens / rep_div
        t_norm_up = (2 * up_params * tokens / tp / (peak * hw.gemm_efficiency)
                     + traffic_scale * norm_traffic / (hw.hbm_bandwidth_gbs * 1e9 * hw.memory_efficiency))
        return {
            "gemm_flops": gemm_flops, "core_flops": core_flops,
            "t_gemm": t_gemm, "t_core": t_core, "t_mem": t_mem, "t_launch": t_launch,
            "t_expert": expert_flops / (peak * hw.expert_gemm_efficiency) if expert_flops else 0.0,
            "t_s2_mem": traffic_scale * s2_traffic / (hw.hbm_bandwidth_gbs * 1e9 * hw.memory_efficiency),
            "fwd": fwd, "bwd": bwd, "overlap_share": overlap_share,
            "saved": saved_dev, "saved_s2": s2_dev, "saved_light": light_dev, "t_norm_up": t_norm_up,
            "routed_tokens": tokens / exp_div if moe else 0.0,
            "input": act_bytes / (tp if sp else 1),
            "act_bytes": act_bytes, "tp_collectives": tp_collectives, "cp_bytes": cp_bytes, "a2a_bytes": a2a,
            "tokens": tokens,
        }

    def _collective_time(self, nbytes: float, size: int, stride: int) -> float:
        if size <= 1 or nbytes <= 0:
            return 0.0
        return nbytes / self.s.hw.group_bandwidth(size, stride) + self.s.hw.collective_latency_us * 1e-6

    def _a2a_time(self, tokens: float, row_bytes: float, ep: int, stride: int) -> float:
        """One all-to-all (a dispatch or a combine) of `tokens` tokens' routed rows of `row_bytes`
        over ep ranks spaced `stride` (= tp) apart: rows for ranks in the same scale-up domain ride
        its links, the rest leave through each chip's own NIC; both run at once.

        Node-limited routing (`route_max_nodes` = M, DeepSeek-V3 §2.1.2 with DeepEP's dispatch)
        sends each token once to each destination node, at most M of them, and the node forwards
        it over its scale-up links to the experts there: the network carries min(M, distinct remote
        nodes) rows per token instead of one per remote expert."""
        if ep <= 1 or tokens <= 0:
            return 0.0
        a, hw = self.s.arch, self.s.hw
        slots = a.slots
        local = max(1, min(ep, hw.scaleup_domain // max(1, stride)))
        up = hw.scaleup_bandwidth_gbs * hw.scaleup_efficiency * 1e9
        out = hw.scaleout_bandwidth_gbs * hw.scaleout_efficiency * 1e9
        in_domain_rows = slots * (local - 1) / ep
        remote_slot_rows = slots * (ep - local) / ep
        if a.route_max_nodes and ep > local:
            nodes = math.ceil(ep / local)
            touched = nodes * (1 - (1 - 1 / nodes) ** slots)  # distinct nodes among a token's experts
            remote_rows = min(a.route_max_nodes, touched) * (nodes - 1) / nodes
            in_domain_rows += remote_slot_rows  # forwarded inside the destination node
        else:
            remote_rows = remote_slot_rows
        t = tokens * in_domain_rows * row_bytes / up
        if remote_rows > 0:
            t = max(t, tokens * remote_rows * row_bytes / out)
        return t + hw.collective_latency_us * 1e-6

    def _a2a_rows(self) -> tuple[float, float]:
        """(dispatch, combine) bytes per row in the forward: FP8 training dispatches e4m3 rows with
        1x128 fp32 scales and combines in bf16 (DeepSeek-V3 §3.3); otherwise both bf16. The
        backward sends bf16 gradients both ways."""
        H = self.s.arch.hidden_size
        return (H * (1 + 4 / 128), 2.0 * H) if self.s.precision == "fp8" else (2.0 * H, 2.0 * H)

    # --- one layer-microbatch, all passes, with communication ------------------------------------------
    def _layer_time(self, moe: bool, L: Layout, mtp: bool = False) -> dict[str, float]:
        key = (moe, L.tp, L.cp, L.microbatch, L.recompute, L.ep, L.ep_schedule, mtp)
        cached = self._layer_time_cache.get(key)
        if cached is None:
            cached = self._layer_time_cache[key] = self._layer_time_uncached(moe, L, mtp)
        return cached

    def _layer_time_uncached(self, moe: bool, L: Layout, mtp: bool) -> dict[str, float]:
        q = self._layer(moe, L.tp, L.cp, L.microbatch, mtp)
        stack = self.s.stack
        passes = 3 if L.recompute == "full" else 2
        compute = (q["t_gemm"] + q["t_core"]) * 3 + 0.5 * q["t_core"] * (self.s.stack.flash_attention)
        mem = q["t_mem"] * 3
        launch = q["t_launch"] * 3
        if moe and stack.expert_row_buckets > 0:
            # zero rows padding each expert to its bucket: real GEMM work, forward and backward
            compute += 3 * q["t_expert"] * self.expert_buckets(L)[0]
        if L.recompute == "full":
            compute += q["t_gemm"] + q["t_core"]
            mem += q["t_mem"]
            launch += q["t_launch"]
        elif L.recompute == "selective":
            compute += 0.5 * q["t_core"] * (not stack.flash_attention)  # QK^T again for the softmax
            mem += q["t_s2_mem"]
        elif L.recompute == "norm_up":
            compute += q["t_norm_up"]
        tp = 0.0
        if L.tp > 1:
            one = self._collective_time(ring_bytes("all_reduce", L.tp, q["act_bytes"]), L.tp, 1)
            tp = passes * q["tp_collectives"] * one * (1 - stack.tp_overlap)
        cp = 0.0
        if L.cp > 1:
            # K/V gathered forward, their gradients reduce-scattered backward, hidden behind attention
            one = self._collective_time(q["cp_bytes"], L.cp, L.tp * L.ep)  # mesh order: cp outside ep
            cp = max(0.0, one - q["t_core"]) * (passes - 1) + max(0.0, one - 2 * q["t_core"])
        ep = 0.0
        if moe and L.ep > 1:
            dispatch, combine = self._a2a_rows()
            bf16 = 2.0 * self.s.arch.hidden_size
            tokens = q["routed_tokens"]
            fwd = self._a2a_time(tokens, dispatch, L.ep, L.tp) + self._a2a_time(tokens, combine, L.ep, L.tp)
            bwd = 2 * self._a2a_time(tokens, bf16, L.ep, L.tp)
            forwards = passes - 1  # the forward, and again under full recomputation
            if L.ep_schedule == "shortcut":
                # ScMoE: the block's dense work that does not wait for the MoE (FFN0, Attn1, FFN1)
                window = q["fwd"] * q["overlap_share"]
                ep = max(0.0, fwd - window) * forwards + max(0.0, bwd - 2 * window)
            elif L.ep_schedule == "dualbatch":
                # two half micro-batches: one half's all-to-all runs during the other's whole block
                ep = max(0.0, fwd - q["fwd"]) * forwards + max(0.0, bwd - q["bwd"])
                launch *= 2  # every kernel runs once per half
            else:
                ep = fwd * forwards + bwd
        return {"compute": compute, "memory_bound": mem, "overhead": launch, "tp_comm": tp, "ep_comm": ep, "cp_comm": cp}

    def _extras(self, L: Layout) -> tuple[dict[str, float], dict[str, float]]:
        """Work outside the blocks: the embedding (first stage), head, loss and MTP (last stage)."""
        key = (L.tp, L.cp, L.microbatch, L.recompute, L.ep, L.ep_schedule)
        if key not in self._extras_cache:
            self._extras_cache[key] = self._extras_uncached(L)
        return self._extras_cache[key]

    def _extras_uncached(self, L: Layout) -> tuple[dict[str, float], dict[str, float]]:
        s, a, hw = self.s, self.s.arch, self.s.hw
        tokens = L.microbatch * s.seq_len / L.cp
        H, V = a.hidden_size, a.vocab_size
        bw = hw.hbm_bandwidth_gbs * 1e9 * hw.memory_efficiency
        first = {"compute": 0.0, "memory_bound": 0.0, "overhead": 0.0}
        # embedding rows written and their gradient scattered back; n-gram lookups and projection
        first["memory_bound"] = 3 * tokens * H * 2 / bw
        if a.ngram_proj_params:
            branches_width = a.ngram_proj_params / H
            first["memory_bound"] += 3 * tokens * branches_width * 2 / bw
            first["compute"] += 3 * 2 * a.ngram_proj_params * tokens / L.tp / (self.peak * 1e12 * hw.gemm_efficiency)
        first["overhead"] = 3 * 6 * hw.kernel_overhead_us * 1e-6
        if s.precision == "autocast":
            # every forward casts the stage's fp32 weights to bf16 (read 4, write 2 bytes) and the
            # backward casts their bf16 gradients back (read 2, write 4)
            local = self.total_params / (L.tp * L.pp)
            first["memory_bound"] += 12 * local / bw
        last = {"compute": 0.0, "memory_bound": 0.0, "overhead": 0.0}
        heads = 1 + a.mtp_layers
        last["compute"] = 3 * 2 * heads * V * H * tokens / L.tp / (self.peak * 1e12 * hw.gemm_efficiency)
        logit_elems = heads * tokens * V / L.tp
        if s.stack.loss_block_bytes > 0:
            # fused: the same passes over each block, forward and backward at once, on a block sized
            # to stay in cache: at the cache-resident element-wise rate where the entry knows it
            blocks = math.ceil(tokens / self._loss_block_rows(L))
            block_bw = hw.cache_elementwise_gbs * 1e9 if hw.cache_elementwise_gbs > 0 else bw
            last["memory_bound"] = FUSED_LOSS_BYTES_PER_LOGIT * logit_elems / block_bw + 3 * tokens * H * 4 / bw
            last["overhead"] = (heads * blocks * FUSED_LOSS_OPS_PER_BLOCK + 3 * heads) * hw.kernel_overhead_us * 1e-6
        else:
            # cross-entropy on V/tp logits per token and head: upcast, log-softmax, gradient
            last["memory_bound"] = 3 * UNFUSED_LOSS_BYTES_PER_LOGIT * logit_elems / bw + 3 * tokens * H * 4 / bw
            last["overhead"] = 3 * 8 * heads * hw.kernel_overhead_us * 1e-6
        if a.mtp_layers:
            m = self._layer_time(a.mtp_ffn == "moe" and a.is_moe, L, mtp=True)
            for k in ("compute", "memory_bound", "overhead"):
                last[k] += a.mtp_layers * m[k]
            last["tp_comm"] = a.mtp_layers * m["tp_comm"]
            last["ep_comm"] = a.mtp_layers * m["ep_comm"]
            last["cp_comm"] = a.mtp_layers * m["cp_comm"]
        return first, last

    # --- stages -------------------------------------------------------------------------------------------
    def _stages(self, L: Layout, t_layer: float, t_first: float, t_last: float, even: bool) -> tuple[int, int, int] | None:
        """Layers on the first, each middle and the last stage; None when the layout cannot split.

        Balanced stacks move layers off the first and last stages until the embedding and the head
        (plus MTP) no longer make those stages the slowest; otherwise every stage holds L/p layers."""
        n, p = self.s.arch.num_layers, L.pp
        if p == 1:
            return n, 0, 0
        if p > n:
            return None
        if even:
            if n % (p * L.vpp):
                return None
            k = n // p
            return k, (k if p > 2 else 0), k
        for k in range(math.ceil(n / p), n + 1):
            cap = k * t_layer
            f_max = min(k, max(0, math.floor((cap - t_first) / t_layer + 1e-9)))
            l_max = min(k, max(0, math.floor((cap - t_last) / t_layer + 1e-9)))
            middles = min(k, n // max(1, p - 2)) if p > 2 else 0
            rest = n - (p - 2) * middles
            if rest < 0 or rest > f_max + l_max:
                continue
            f = min(f_max, rest)
            return f, middles, rest - f
        k = math.ceil(n / p)  # the extras outweigh whole stages: plain split
        return k, (k if p > 2 else 0), n - k * (p - 1) if n - k * (p - 1) > 0 else k

    # --- evaluate -----------------------------------------------------------------------------------------
    def evaluate(self, L: Layout, detail: bool = True, *, even_stages: bool | None = None) -> TrainPlan | None:
        """The full plan of one layout, or None when the layout is not valid for this setup.
        `detail=False` skips the checkpoint/failure figures (the search adds them to its winners).
        `even_stages`: split the layers evenly over the stages as the runtime does (default: unless
        the stack balances them)."""
        if self.check(L):
            return None
        s, a, hw, stack = self.s, self.s.arch, self.s.hw, self.s.stack
        m = self.microbatches(L)
        # per-layer time, averaged over dense and MoE blocks
        L_moe, L_dense = a.moe_layers, a.num_layers - a.moe_layers
        parts = [(self._layer_time(moe, L), count / a.num_layers) for moe, count in ((True, L_moe), (False, L_dense)) if count]
        keys = ("compute", "memory_bound", "overhead", "tp_comm", "ep_comm", "cp_comm")
        layer = {k: sum(t[k] * w for t, w in parts) for k in keys}
        t_layer = sum(layer.values())
        first, last = self._extras(L)
        even = not stack.balance_stages if even_stages is None else even_stages
        stages = self._stages(L, t_layer, sum(first.values()), sum(last.values()), even)
        if stages is None:
            return None
        n_first, n_mid, n_last = stages
        held = self._stage_params(L, n_first, n_last)
        memory, where = self._memory(L, m, stages, held)
        total_mem = sum(memory.values())
        fits = total_mem <= hw.hbm_gib * GiB
        if not fits and not detail:  # the search only needs the memory of layouts that do not fit
            return TrainPlan(layout=L, fits=False, memory=memory, memory_stage=where, step={}, step_time_s=float("inf"),
                             microbatches=m, global_batch_tokens=0.0, chips_used=L.chips, tokens_per_s=0.0,
                             model_flops_per_token=self.model_flops, model_flops_per_token_noncausal=self.model_flops_noncausal,
                             hw_flops_per_token=0.0, peak_tflops=self.peak, peak_name=self.peak_name, stages={},
                             checkpoint={}, reliability={}, tokens_budget=s.tokens)
        # pipeline p2p per micro-batch and stage: activation forward, its gradient backward
        p2p = 0.0
        if L.pp > 1:
            q = self._layer(bool(L_moe), L.tp, L.cp, L.microbatch)
            nbytes = q["act_bytes"] / (L.tp if (stack.pp_scatter_gather or stack.sequence_parallel) else 1)
            bw = hw.group_bandwidth(2, L.tp * L.cp * L.dp)
            p2p = 2 * L.vpp * (nbytes / bw + hw.collective_latency_us * 1e-6)
        if L.pp == 1:
            candidates = [{k: layer[k] * n_first + first.get(k, 0) + last.get(k, 0) for k in keys}]
        else:
            candidates = [{k: layer[k] * n_first + first.get(k, 0) for k in keys},
                          {k: layer[k] * n_last + last.get(k, 0) for k in keys}]
            if n_mid:
                candidates.append({k: layer[k] * n_mid for k in keys})
        stage = max(candidates, key=lambda c: sum(c.values()))
        stage["pp_p2p"] = p2p
        t_stage = sum(stage.values())
        step = {k: v * m for k, v in stage.items()}
        step["pipeline_bubble"] = ((L.pp - 1) / L.vpp) * t_stage if L.pp > 1 else 0.0
        # data-parallel gradient synchronisation and the optimizer step, for the fullest stage
        dense_max = max(d for d, _, _ in held.values())
        expert_max = max(e for _, e, _ in held.values())
        step["dp_comm"] = self._dp_time(L, m, dense_max, expert_max, t_stage)
        step["optimizer"] = self._optimizer_time(L, dense_max, expert_max)
        step_time = sum(step.values())
        tokens_per_step = m * L.microbatch * s.seq_len * L.dp
        hw_flops = self.model_flops + 3 * (sum(self.executed.values()) - sum(self.causal.values())) + self._recompute_flops(L)
        plan = TrainPlan(
            layout=L, fits=fits, memory=memory, memory_stage=where,
            step=step, step_time_s=step_time, microbatches=m, global_batch_tokens=tokens_per_step,
            chips_used=L.chips, tokens_per_s=tokens_per_step / step_time,
            model_flops_per_token=self.model_flops, model_flops_per_token_noncausal=self.model_flops_noncausal,
            hw_flops_per_token=hw_flops, peak_tflops=self.peak, peak_name=self.peak_name,
            stages={"first": n_first, "middle": n_mid, "last": n_last} if L.pp > 1 else {"only": n_first},
            checkpoint={}, reliability={}, tokens_budget=s.tokens,
        )
        if not plan.fits:
            plan.problems.append(f"needs {total_mem / GiB:,.1f} GiB per device on the {where} stage; the chip has {hw.hbm_gib:g} GiB")
        if detail:
            self.finish(plan)
        return plan

    def finish(self, plan: TrainPlan) -> TrainPlan:
        """What the search leaves out until a plan is shown: the micro-batch count in its layout,
        how the runtime would run it, checkpoints and failures."""
        L = plan.layout
        if L.pp > 1 and not L.parallel.pp_microbatches:
            plan.layout = L.replace(pp_microbatches=plan.microbatches)
        plan.runtime = self.runtime(plan.layout)
        n, st = self.s.arch.num_layers, plan.stages
        if L.pp > 1 and plan.runtime["parallel"] and {st["first"], st["last"]} | ({st["middle"]} if L.pp > 2 else set()) != {n // L.pp}:
            plan.runtime["differs"].append(
                f"the plan balances the stages (first {st['first']}, middle {st['middle']}, last {st['last']} layers); "
                f"the runtime gives every stage {n // L.pp}")
            plan.runtime["runs_as_planned"] = False
        self._reliability(plan)
        return plan

    def microbatches(self, L: Layout) -> int:
        return max(1, round(self.s.sequences / (L.dp * L.microbatch)))

    def runtime(self, L: Layout) -> dict[str, Any]:
        """How `longcat train --parallel` would run this layout: the `--parallel` string (None when
        the runtime rejects these degrees), what it rejects, what it runs differently from the plan,
        and the train settings that give the planned batch."""
        s, a, stack = self.s, self.s.arch, self.s.stack
        m = self.microbatches(L)
        rejected, differs, settings = [], [], []
        if L.tp > 1 and a.ffn_hidden_size % L.tp:
            rejected.append(f"tp={L.tp} must divide ffn_hidden_size={a.ffn_hidden_size} (the runtime splits dense-FFN columns)")
        if L.tp > 1 and L.cp > 1:
            rejected.append("the runtime cannot combine tp > 1 with cp > 1")
        if a.num_layers % (L.pp * L.vpp):
            rejected.append(f"pp*pp_stages_per_rank = {L.pp * L.vpp} must divide the {a.num_layers} layers "
                            "(the runtime splits them evenly; the plan balances uneven stages)")
        if L.pp > 1 and m % L.pp:
            rejected.append(f"the runtime needs pp_microbatches (here {m}) to be a multiple of pp={L.pp}")
        if L.cp > 1 and s.seq_len % (2 * L.cp):
            rejected.append(f"cp={L.cp} needs --seq-len divisible by 2*cp={2 * L.cp} (zig-zag chunks)")
        if L.zero != 3 and max(L.shard_group, L.expert_shard_group) > 1:
            differs.append(f"zero={L.zero}: the runtime is FSDP, it shards weights, gradients and optimizer state "
                           f"over dp_shard*cp={L.shard_group} (zero=3)")
        if L.recompute != "none":
            differs.append(f"recompute={L.recompute}: the runtime keeps every activation (recompute=none)")
        if L.ep_schedule != "none":
            differs.append(f"ep_schedule={L.ep_schedule}: the runtime's expert all-to-all waits for its rows "
                           "(ep_schedule=none)")
        if L.tp > 1 and stack.sequence_parallel:
            differs.append(f"tp={L.tp}: the runtime's tensor parallelism has no sequence parallelism "
                           "(plan with --stack-set sequence_parallel=false)")
        if s.optimizer != "adamw" and L.chips > 1:
            differs.append(f"--optimizer {s.optimizer}: the runtime trains sharded layouts with AdamW only")
        if L.pp > 1:
            settings.append("pp > 1 trains the next-token loss only: train.mtp_weight=0, train.z_loss=0, "
                            "train.balance_loss=0, train.indexer_loss_weight=0")
        elif L.cp > 1 and a.mtp_layers:
            settings.append("cp > 1 trains no MTP heads: train.mtp_weight=0")
        if L.tp > 1 and a.index_heads:
            settings.append("tp > 1 trains no LSA indexer loss: train.indexer_loss_weight=0")
        micro_batch = L.dp * L.microbatch * (m if L.pp > 1 else 1)
        return {
            "parallel": None if rejected else str(L.parallel.replace(pp_microbatches=m) if L.pp > 1 else L.parallel),
            "runs_as_planned": not rejected and not differs,
            "rejected": rejected, "differs": differs, "settings": settings,
            "nproc": L.chips, "seq_len": s.seq_len, "micro_batch": micro_batch, "grad_accum": 1 if L.pp > 1 else m,
        }

    def check(self, L: Layout) -> list[str]:
        """Why a layout is invalid for this setup (empty when it is valid)."""
        s, a = self.s, self.s.arch
        out = []
        if L.chips > s.chips:
            out.append(f"pp*dp_replicate*dp_shard*cp*tp = {L.chips} exceeds --chips {s.chips}")
        if a.num_heads % L.tp:
            out.append(f"tp={L.tp} must divide the {a.num_heads} attention heads")
        if s.seq_len % L.cp:
            out.append(f"cp={L.cp} must divide --seq-len {s.seq_len}")
        if L.pp > a.num_layers:
            out.append(f"pp={L.pp} exceeds the {a.num_layers} layers")
        elif not s.stack.balance_stages and a.num_layers % L.pp:
            out.append(f"pp={L.pp} must divide the {a.num_layers} layers (stack '{s.stack.name}' splits evenly)")
        if L.ep > 1:
            if not a.is_moe:
                out.append("ep > 1 needs an MoE model")
            elif a.n_routed_experts % L.ep:
                out.append(f"ep={L.ep} must divide the {a.n_routed_experts} routed experts")
            elif L.dp_shard % L.ep:
                out.append(f"ep={L.ep} must divide dp_shard={L.dp_shard} (expert-parallel ranks are taken from the data-shard ranks)")
        if L.ep_schedule not in EP_SCHEDULES:
            out.append(f"ep_schedule must be one of {', '.join(EP_SCHEDULES)}, got '{L.ep_schedule}'")
        elif L.ep_schedule != "none" and (L.ep <= 1 or not a.is_moe):
            out.append(f"ep_schedule={L.ep_schedule} hides an expert all-to-all: it needs an MoE model and ep > 1 "
                       "(use ep_schedule=none)")
        elif L.ep_schedule == "shortcut" and a.moe_style != "shortcut":
            out.append("ep_schedule=shortcut needs a shortcut MoE (LongCat ScMoE: moe_style = 'shortcut'); "
                       "use dualbatch or none")
        if L.recompute not in RECOMPUTE:
            out.append(f"recompute must be one of {', '.join(RECOMPUTE)}, got '{L.recompute}'")
        if L.schedule not in SCHEDULES:
            out.append(f"pp_schedule must be one of {', '.join(SCHEDULES)}, got '{L.schedule}'")
        elif L.schedule == "interleaved":
            if L.pp == 1 or L.vpp < 2:
                out.append("the interleaved schedule needs pp > 1 and pp_stages_per_rank >= 2")
            elif a.num_layers % (L.pp * L.vpp) and not s.stack.balance_stages:
                out.append(f"interleaved: pp*vpp = {L.pp * L.vpp} must divide the {a.num_layers} layers (stack '{s.stack.name}' splits evenly)")
            elif a.num_layers < L.pp * L.vpp:
                out.append(f"interleaved: pp*vpp = {L.pp * L.vpp} exceeds the {a.num_layers} layers")
            elif self.microbatches(L) < L.pp:
                out.append(f"interleaved: needs at least pp={L.pp} micro-batches, has {self.microbatches(L)}")
        elif L.vpp != 1:
            out.append("pp_stages_per_rank > 1 needs pp_schedule=interleaved")
        fixed_m = L.parallel.pp_microbatches
        if L.pp > 1 and fixed_m and fixed_m != self.microbatches(L):
            out.append(f"pp_microbatches={fixed_m}, but the global batch of {s.sequences:g} sequences makes "
                       f"{self.microbatches(L)} micro-batches of microbatch={L.microbatch} on dp={L.dp} ranks; "
                       f"leave pp_microbatches out or change microbatch or --global-batch-tokens")
        if L.microbatch * L.dp > s.sequences * 1.5:
            out.append(f"microbatch*dp = {L.microbatch * L.dp} sequences exceeds the global batch of {s.sequences:g} sequences")
        return out

    # --- parameters, memory ---------------------------------------------------------------------------------
    def _stage_params(self, L: Layout, n_first: int, n_last: int) -> dict[str, tuple[float, float, float]]:
        """Per stage kind: (dense, expert, fully sharded n-gram) parameters on one device, before ZeRO."""
        a, p = self.s.arch, self.params
        embed = p["embedding"] / L.tp
        head = (p["embedding"] if a.tied_embeddings else p["lm_head"]) / L.tp
        # n-gram tables sharded row-wise over every device of the first stage, like an embedding
        ngram = a.ngram_table_params / (L.tp * L.cp * L.dp)
        ngram_proj = a.ngram_proj_params / L.tp
        mtp = self.mtp_dense / L.tp
        if L.pp == 1:
            dense = self.layer_dense_params * a.num_layers / L.tp + embed + ngram_proj + mtp + (0 if a.tied_embeddings else head)
            return {"only": (dense, (self.layer_expert_params * a.num_layers + self.mtp_expert) / L.ep, ngram)}
        return {
            "first": (self.layer_dense_params * n_first / L.tp + embed + ngram_proj, self.layer_expert_params * n_first / L.ep, ngram),
            "last": (self.layer_dense_params * n_last / L.tp + head + mtp, (self.layer_expert_params * n_last + self.mtp_expert) / L.ep, 0.0),
        }

    def _state_bytes(self) -> tuple[float, float, float]:
        """(weights, gradients, optimizer incl. fp32 master) bytes per parameter."""
        s = self.s
        moment = s.stack.optimizer_state_bytes
        adam = 2 * moment
        opt = adam if s.optimizer == "adamw" else self.muon_share * moment + (1 - self.muon_share) * adam
        if s.precision == "autocast":
            return 4.0, 4.0, opt  # fp32 weights are the master copy
        return 2.0, 4.0, opt + 4.0

    def _activations(self, L: Layout) -> tuple[float, float]:
        """(stored per layer and micro-batch, working set of the layer being recomputed)."""
        a = self.s.arch
        stored, working = 0.0, 0.0
        share_moe = a.moe_layers / a.num_layers
        for moe, share in ((True, share_moe), (False, 1 - share_moe)):
            if share <= 0:
                continue
            q = self._layer(moe, L.tp, L.cp, L.microbatch)
            if L.recompute == "full":
                stored += share * q["input"]
                working = max(working, q["saved"])
            elif L.recompute == "selective":
                stored += share * (q["saved"] - q["saved_s2"])
            elif L.recompute == "norm_up":
                stored += share * (q["saved"] - q["saved_light"])
            else:
                stored += share * q["saved"]
        return stored, working

    def _loss_block_rows(self, L: Layout) -> float:
        """Rows per block of the fused loss: loss_block_bytes of fp32 logits, at least the minimum."""
        stack = self.s.stack
        tokens = L.microbatch * self.s.seq_len / L.cp
        rows = max(stack.loss_block_min_rows, stack.loss_block_bytes / (4 * self.s.arch.vocab_size / L.tp))
        return min(tokens, rows)

    def _loss_bytes(self, L: Layout) -> float:
        """What the output heads' loss holds at its peak on the last stage, for one micro-batch."""
        a, stack = self.s.arch, self.s.stack
        tokens = L.microbatch * self.s.seq_len / L.cp
        heads = 1 + a.mtp_layers
        V, H = a.vocab_size / L.tp, a.hidden_size
        if stack.loss_block_bytes <= 0:
            # unfused: every head's logits kept (logits_bytes each), plus the backward's transient
            return tokens * V * (stack.logits_bytes * heads + stack.logits_backward_bytes)
        # fused: kept until the backward, per head, the hidden-state gradient in the compute dtype
        # (bf16) and the fp32 head-weight gradient; the transient of one block is its bf16 product,
        # fp32 logits (softmax made in place) and bf16 gradient (2 + 4 + 2 B per logit), with the
        # head weight's bf16 copy, the block's bf16 weight-gradient product and its fp32 upcast
        # (2 + 2 + 4 B per weight) and the bf16 copy of the hidden states
        kept = heads * (tokens * H * 2 + V * H * 4)
        transient = self._loss_block_rows(L) * V * 8 + V * H * 8 + tokens * H * 2
        return kept + transient

    def _memory(self, L: Layout, m: int, stages: tuple[int, int, int], held: dict):
        s, a, hw, stack = self.s, self.s.arch, self.s.hw, self.s.stack
        w_b, g_b, o_b = self._state_bytes()
        # ZeRO shards over dp_shard*cp (dense) and dp_shard/ep*cp (experts), as FSDP does in the
        # runtime; dp_replicate copies and the TP ranks' copies of the experts stay whole.
        dp_group, edp_group = L.shard_group, L.expert_shard_group
        stored, working = self._activations(L)
        if L.schedule == "gpipe":
            inflight = m
        elif L.schedule == "interleaved":
            inflight = min(m, L.pp + (L.pp - 1) / L.vpp)
        else:
            inflight = min(m, L.pp)
        logits = self._loss_bytes(L)
        mtp_act = 0.0
        if a.mtp_layers:
            q = self._layer(a.mtp_ffn == "moe" and a.is_moe, L.tp, L.cp, L.microbatch, True)
            mtp_act = a.mtp_layers * (q["input"] if L.recompute == "full" else q["saved"])
        q = self._layer(bool(a.moe_layers), L.tp, L.cp, L.microbatch)
        comm = 0.0
        if L.tp > 1:
            comm += 2 * q["act_bytes"]
        if L.ep > 1:
            comm += 2 * q["a2a_bytes"]
        if L.dp * L.cp > 1:
            comm += 2 * 40e6 * stack.grad_reduce_bytes  # two gradient buckets in flight
        if L.pp > 1:
            comm += 2 * q["act_bytes"] / L.tp
        if L.zero >= 3 and max(dp_group, edp_group) > 1:
            per_layer = self.layer_dense_params / L.tp + self.layer_expert_params / L.ep
            comm += 2 * w_b * per_layer  # the next layers' gathered weights
        n_first, _, n_last = stages
        best = None
        for where, (dense, experts, ngram) in held.items():
            def sharded(on: bool) -> float:
                return (dense / dp_group + experts / edp_group) if on else dense + experts
            weights = w_b * (sharded(L.zero >= 3) + ngram)
            if s.precision == "autocast":
                weights += 2.0 * (dense + experts)  # bf16 copies autocast keeps for the backward
            memory = {
                "weights": weights,
                "gradients": g_b * (sharded(L.zero >= 2) + ngram),
                "optimizer": o_b * (sharded(L.zero >= 1) + ngram),
                # an fp32 EMA of the weights, sharded like the optimizer state; none on the device when offloaded
                "ema": 4.0 * (sharded(L.zero >= 1) + ngram) if stack.ema and not stack.ema_offload else 0.0,
            }
            if where == "only":
                memory.update(activations=stored * n_first + mtp_act + working, pipeline_inflight=0.0, logits=logits)
            elif where == "first":
                memory.update(activations=stored * n_first + working, pipeline_inflight=stored * n_first * (inflight - 1), logits=0.0)
            else:
                memory.update(activations=stored * n_last + mtp_act + working, pipeline_inflight=0.0, logits=logits)
            if not stack.persistent_grads:
                # gradients set to None between steps appear while the backward frees activations:
                # the peak is the larger phase, so count only what exceeds the freed activations
                freed = memory["activations"] + memory["pipeline_inflight"] + memory["logits"]
                memory["gradients"] = max(0.0, memory["gradients"] - freed)
            memory["comm_buffers"] = comm
            memory["allocator"] = allocator_retained(memory, hw.allocator_retention)
            memory["reserved"] = hw.reserved_gib * GiB
            memory["library"] = min(hw.library_cache_gib * GiB, self.library_shapes(L) * hw.library_cache_per_shape_mib * 2**20)
            if best is None or sum(memory.values()) > sum(best[0].values()):
                best = (memory, where)
        return best

    # --- time outside the pipeline ---------------------------------------------------------------------
    def _dp_time(self, L: Layout, m: int, dense: float, experts: float, t_stage: float) -> float:
        stack = self.s.stack
        gb = stack.grad_reduce_bytes
        w_b = 2.0
        dp_group, edp = L.shard_group, L.expert_shard_group
        def group_time(n_params: float, size: int, stride: int) -> tuple[float, float]:
            """(per-step comm, per-micro-batch comm)."""
            if size <= 1 or n_params <= 0:
                return 0.0, 0.0
            t = lambda kind, nbytes: self._collective_time(ring_bytes(kind, size, nbytes), size, stride)
            if L.zero == 0:
                return t("all_reduce", n_params * gb), 0.0
            if L.zero == 1:
                return t("reduce_scatter", n_params * gb) + t("all_gather", n_params * w_b), 0.0
            if L.zero == 2:
                return t("all_gather", n_params * w_b), t("reduce_scatter", n_params * gb)
            gathers = 3 if L.recompute == "full" else 2
            return 0.0, gathers * t("all_gather", n_params * w_b) + t("reduce_scatter", n_params * gb)
        def all_reduce(nbytes: float, size: int, stride: int) -> float:
            return self._collective_time(ring_bytes("all_reduce", size, nbytes), size, stride)
        # mesh strides (tp innermost, then ep, cp, dp_shard/ep, dp_replicate): the dense shard group
        # (dp_shard*cp) is tp apart, the expert shard group (dp_shard/ep*cp) tp*ep apart
        step_d, mb_d = group_time(dense, dp_group, L.tp)
        step_e, mb_e = group_time(experts, edp, L.tp * L.ep)
        per_step, per_mb = step_d + step_e, mb_d + mb_e
        # copies outside the shard groups all-reduce the (sharded) gradient once per step: the
        # dp_replicate replicas (HSDP; plain DDP when nothing is sharded), and for the experts also
        # the TP ranks when sequence parallelism gives them different tokens
        d_shard, e_shard = (dp_group, edp) if L.zero >= 1 else (1, 1)
        if L.dp_replicate > 1:
            stride = L.tp * L.cp * L.dp_shard
            per_step += all_reduce(dense / d_shard * gb, L.dp_replicate, stride)
            per_step += all_reduce(experts / e_shard * gb, L.dp_replicate, stride)
        if L.tp > 1 and stack.sequence_parallel and experts > 0:
            per_step += all_reduce(experts / e_shard * gb, L.tp, 1)
        t_mb = t_stage  # one micro-batch's forward+backward on the stage
        if stack.overlap_grad_reduce:
            # buckets go out during the last backward; the parameter gather overlaps the first forward
            exposed = max(0.0, per_step - t_mb) + m * max(0.0, per_mb - t_mb)
        else:
            exposed = per_step + m * per_mb
        return exposed

    def _optimizer_time(self, L: Layout, dense: float, experts: float) -> float:
        s, hw = self.s, self.s.hw
        local = dense / (L.shard_group if L.zero >= 1 else 1) + experts / (L.expert_shard_group if L.zero >= 1 else 1)
        t = local * s.stack.optimizer_traffic_bytes / (hw.hbm_bandwidth_gbs * 1e9 * hw.memory_efficiency)
        if s.optimizer == "muon":
            # Newton-Schulz: 5 iterations of ~6*m^2*n FLOPs on each m x n matrix (m ~ hidden size)
            t += local * self.muon_share * 30 * s.arch.hidden_size / (s.hw.peak_tflops_bf16 * 1e12 * hw.gemm_efficiency)
        return t

    def _recompute_flops(self, L: Layout) -> float:
        """Extra forward FLOPs per token that recomputation executes (blocks only, not the head)."""
        ex = self.executed
        if L.recompute == "full":
            return ex["layers_gemm"] + ex["attention_core"] + (ex["mtp"] - 2 * self.s.arch.mtp_layers * self.s.arch.vocab_size * self.s.arch.hidden_size)
        if L.recompute == "selective" and not self.s.stack.flash_attention:
            return 0.5 * ex["attention_core"]
        if L.recompute == "norm_up" and self.s.arch.attention == "mla":
            a = self.s.arch
            return 2 * a.num_layers * a.attn_per_layer * a.num_heads * (
                a.q_lora_rank * a.qk_dim + a.kv_lora_rank * (a.qk_nope_head_dim + a.v_head_dim))
        return 0.0

    # --- checkpoints and failures ----------------------------------------------------------------------
    def _reliability(self, plan: TrainPlan) -> None:
        s, hw = self.s, self.s.hw
        opt_bytes = self._state_bytes()[2] if s.precision != "autocast" else self._state_bytes()[2] + 4
        size = self.total_params * opt_bytes  # fp32 master + optimizer moments: what a resume needs
        weights_only = self.total_params * 2
        bandwidth = min(plan.chips_used * hw.storage_write_gbs_per_chip, hw.storage_write_gbs_max) * 1e9
        write_s = size / bandwidth
        plan.checkpoint = {"size_gb": size / 1e9, "weights_bf16_gb": weights_only / 1e9, "write_s": write_s,
                           "write_bandwidth_gbs": bandwidth / 1e9}
        mtbf_s = hw.chip_mtbf_hours * 3600 / plan.chips_used  # the job stops when any chip fails
        delta, restart = write_s, hw.restart_minutes * 60
        if delta < 2 * mtbf_s:  # Daly 2006, higher-order form of Young's sqrt(2 * delta * M)
            ratio = delta / (2 * mtbf_s)
            interval = math.sqrt(2 * delta * mtbf_s) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - delta
        else:
            interval = mtbf_s
        interval = max(interval, delta)
        # lost fraction: checkpoint writes, half an interval redone per failure, and the restart
        waste = delta / (interval + delta) + (interval / 2 + restart) / mtbf_s
        goodput = max(0.0, 1 - waste)
        days = plan.days
        plan.reliability = {
            "job_mtbf_hours": mtbf_s / 3600, "checkpoint_interval_min": interval / 60,
            "expected_failures": days * 86400 / mtbf_s if days else 0.0, "goodput": goodput,
        }


# ------------------------------------------------------------------------------------------------------
# search


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def candidate_layouts(planner: Planner, fixed: dict[str, Any], *, runnable: bool = False) -> list[tuple[Layout, ...]]:
    """Groups of layouts that share the parallel degrees and micro-batch and differ in (zero,
    recompute), with the first `ep_schedule_choices` schedule (`search` tries the others on each
    group's winner). `fixed` uses the `parse_layout` names; `runnable` keeps to zero=3, no
    recomputation and ep_schedule=none (what the runtime does)."""
    fixed = normalize_fixed(fixed)
    s, a, hw = planner.s, planner.s.arch, planner.s.hw
    N = s.chips
    tps = [fixed["tp"]] if "tp" in fixed else [t for t in _pow2_upto(min(a.num_heads, max(hw.scaleup_domain, 1), 64)) if a.num_heads % t == 0]
    cps = [fixed["cp"]] if "cp" in fixed else [c for c in _pow2_upto(16) if s.seq_len % c == 0 and (c == 1 or s.seq_len // c >= 2048)]
    if "pp" in fixed:
        pps = [fixed["pp"]]
    else:
        L = a.num_layers
        if s.stack.balance_stages and not runnable:
            pps = sorted({math.ceil(L / k) for k in range(1, L + 1)})
        else:
            pps = [p for p in range(1, L + 1) if L % p == 0]
    schedules = [fixed["pp_schedule"]] if "pp_schedule" in fixed else ["1f1b", "interleaved"]
    zeros = [fixed["zero"]] if "zero" in fixed else ([3] if runnable else [1, 2, 3])
    recomputes = [fixed["recompute"]] if "recompute" in fixed else (["none"] if runnable else ["none", "norm_up", "selective", "full"])
    if s.stack.flash_attention and "recompute" not in fixed and not runnable:
        recomputes = ["none", "norm_up", "full"]  # selective only drops the S x S scores flash never stores
    fixed_shard, fixed_rep = fixed.get("dp_shard"), fixed.get("dp_replicate")
    out = []
    for tp in tps:
        for cp in cps:
            for pp in pps:
                if tp * cp * pp > N:
                    continue
                dp_max = N // (tp * cp * pp)
                if a.is_moe:
                    eps = [fixed["ep"]] if "ep" in fixed else [e for e in _pow2_upto(a.n_routed_experts) if a.n_routed_experts % e == 0] + (
                        [a.n_routed_experts] if a.n_routed_experts & (a.n_routed_experts - 1) else [])
                else:
                    eps = [fixed.get("ep", 1)]
                for ep in eps:
                    # memory does not depend on the schedule: the search tries the others on each
                    # group's winner only (search)
                    ep_schedule = ep_schedule_choices(a, ep, fixed, runnable)[0]
                    if "dp" in fixed:
                        dps = [fixed["dp"]]
                    elif fixed_shard is not None and fixed_rep is not None:
                        dps = [fixed_shard * fixed_rep]
                    else:
                        # ep ranks come out of dp_shard, so the data-parallel degree is a multiple
                        # of ep (of the fixed dp_shard, or of dp_replicate*ep)
                        step = fixed_shard if fixed_shard is not None else ep * (fixed_rep or 1)
                        d = dp_max // step * step
                        if d == 0 or d * tp * cp * pp < 0.85 * N and ep > 1:
                            continue
                        dps = [d]
                    for dp in dps:
                        per_replica = s.sequences / dp
                        if per_replica < 1 and "dp" not in fixed:
                            continue
                        # micro-batches of up to 32K tokens (larger ones only add memory and bubble)
                        mbs = [fixed["microbatch"]] if "microbatch" in fixed else [
                            b for b in _pow2_upto(16) if b <= max(1, per_replica) and (b == 1 or b * s.seq_len <= 32768)]
                        if fixed.get("pp_microbatches") and pp > 1:
                            mbs = [b for b in mbs if max(1, round(s.sequences / (dp * b))) == fixed["pp_microbatches"]]
                        for b in mbs:
                            for sched in schedules:
                                if sched == "interleaved":
                                    if pp == 1:
                                        continue
                                    even = runnable or not s.stack.balance_stages
                                    vpps = [fixed["pp_stages_per_rank"]] if "pp_stages_per_rank" in fixed else [
                                        v for v in (2, 3, 4) if (a.num_layers % (pp * v) == 0 if even else a.num_layers >= pp * v)]
                                else:
                                    vpps = [1]
                                for v in vpps:
                                    degrees: dict[tuple[int, int], ParallelLayout] = {}
                                    for z in zeros:
                                        shard, rep = split_dp(dp, fixed_shard, fixed_rep, ep=ep, zero=z)
                                        if (shard, rep) not in degrees:
                                            degrees[shard, rep] = ParallelLayout(
                                                dp_shard=shard, dp_replicate=rep, ep=ep, tp=tp, cp=cp, pp=pp, pp_schedule=sched,
                                                pp_stages_per_rank=v, pp_microbatches=fixed.get("pp_microbatches", 0) if pp > 1 else 0)
                                    out.append(tuple(
                                        Layout(degrees[split_dp(dp, fixed_shard, fixed_rep, ep=ep, zero=z)], zero=z, recompute=r,
                                               microbatch=b, ep_schedule=ep_schedule)
                                        for r in recomputes for z in zeros))
    return out


def ep_schedule_choices(a: Architecture, ep: int, fixed: dict[str, Any], runnable: bool) -> list[str]:
    """What may hide the expert all-to-all: fixed by --layout; none for the runtime (--runnable) or
    without one; otherwise dualbatch, and shortcut for a ScMoE model (the search keeps the faster)."""
    if "ep_schedule" in fixed:
        return [fixed["ep_schedule"]]
    if runnable or ep <= 1 or not a.is_moe:
        return ["none"]
    return ["shortcut", "dualbatch"] if a.moe_style == "shortcut" else ["dualbatch"]


def _better(a: TrainPlan, b: TrainPlan) -> bool:
    """Faster wins; within 0.5% the one that needs less memory."""
    if abs(a.tokens_per_s - b.tokens_per_s) <= 5e-3 * b.tokens_per_s:
        return a.memory_gib["total"] < b.memory_gib["total"]
    return a.tokens_per_s > b.tokens_per_s


def search(planner: Planner, fixed: dict[str, Any] | None = None, top: int = 5, *, runnable: bool = False) -> list[TrainPlan]:
    """Rank layouts: those that fit first, then by throughput. Fields in `fixed` (`parse_layout`
    names or the aliases) are not searched. `runnable`: only layouts the runtime
    (`longcat train --parallel`) runs exactly as planned."""
    fixed = normalize_fixed(dict(fixed or {}))
    if fixed.get("pp_schedule") == "interleaved" and fixed.get("pp_stages_per_rank", 2) < 2:
        fixed.pop("pp_stages_per_rank")
    by_shape: dict[tuple, TrainPlan] = {}
    fallback: list[TrainPlan] = []
    for group in candidate_layouts(planner, fixed, runnable=runnable):
        chosen = None
        fitted: list[Layout] = []
        for layout in group:
            # step time never falls with more recomputation or a higher ZeRO stage, so a layout is
            # dominated by any fitting one with less of both
            if any(RECOMPUTE.index(f.recompute) <= RECOMPUTE.index(layout.recompute) and f.zero <= layout.zero for f in fitted):
                continue
            if planner.check(layout) or (runnable and not planner.runtime(layout)["runs_as_planned"]):
                continue
            plan = planner.evaluate(layout, detail=False, even_stages=True if runnable else None)
            if plan is None:
                continue
            if plan.fits:
                fitted.append(layout)
                if chosen is None or _better(plan, chosen):
                    chosen = plan
            else:
                fallback.append(plan)
                if len(fallback) > 4 * top:
                    fallback.sort(key=lambda p: p.memory_gib["total"])
                    del fallback[2 * top:]
        if chosen is not None:
            for other in ep_schedule_choices(planner.s.arch, chosen.layout.ep, fixed, runnable)[1:]:
                plan = planner.evaluate(chosen.layout.replace(ep_schedule=other), detail=False,
                                        even_stages=True if runnable else None)
                if plan is not None and plan.fits and plan.tokens_per_s > chosen.tokens_per_s:
                    chosen = plan
            # keep the best per shape (tp, pp, cp) so the ranking shows distinct options
            L = chosen.layout
            shape = (L.tp, L.pp, L.cp)
            if shape not in by_shape or _better(chosen, by_shape[shape]):
                by_shape[shape] = chosen
    best = list(by_shape.values())
    best.sort(key=lambda p: -p.tokens_per_s)
    for plan in best[:top]:
        planner.finish(plan)
    if best:
        return best[:top]
    # nothing fits: the layouts that come closest, fully evaluated so they show what to change
    fallback.sort(key=lambda p: p.memory_gib["total"])
    return [planner.evaluate(p.layout, even_stages=True if runnable else None) for p in fallback[:top]]


__all__ = ["TrainSetup", "TrainPlan", "Planner", "search", "candidate_layouts", "ring_bytes", "OPTIMIZERS", "PRECISIONS"]
