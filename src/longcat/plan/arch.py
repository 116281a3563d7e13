"""Architecture descriptions for the planner: any dense or MoE decoder, from a preset or a TOML file.

The planner needs three things per token of a layer: the parameters it touches (FLOPs), the
tensors its backward pass keeps (activation memory, Korthikanti et al. 2022 generalised), and the
bytes its element-wise kernels move (memory-bound time). `Architecture` describes a model at
the level of detail those need and no further: GPT/Llama-style MHA/GQA with a SwiGLU or GELU MLP,
MoE with routed, shared and zero-computation experts, MLA, sparse attention with a
selected-token budget and an indexer, n-gram embedding tables, and MTP heads.

LongCat presets convert exactly (`from_longcat`); tests check the parameter total against
`longcat.model.count.count_parameters`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..catalog import catalog_dir, catalog_names
from ..config import PRESETS, ConfigError, ModelConfig, load_config, preset

BF16 = 2  # bytes of one activation element


@dataclass
class Architecture:
    """A decoder-only transformer, dense or MoE. Sizes follow the usual Hugging Face names."""

    name: str = "model"
    source: str = ""
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32  # decoder blocks
    # --- attention ---------------------------------------------------------------------------------
    attention: str = "gqa"  # "gqa" (MHA when num_kv_heads == num_heads) or "mla"
    num_heads: int = 32
    num_kv_heads: int = 0  # gqa: 0 means num_heads (MHA)
    head_dim: int = 0  # gqa: 0 means hidden_size // num_heads
    q_lora_rank: int = 0  # mla: 0 means a full-rank query projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0  # mla (gqa: 0 means head_dim)
    attn_per_layer: int = 1  # attention sublayers per block (LongCat: 2)
    # --- sparse attention: each query attends to at most sparse_topk selected keys ------------------
    sparse_topk: int = 0  # 0 = dense attention
    index_heads: int = 0  # lightning indexer heads (0 = no indexer)
    index_head_dim: int = 0
    indexers_per_layer: int = 1  # LongCat: sublayer 1 reuses sublayer 0's choice
    # --- dense FFN -----------------------------------------------------------------------------------
    mlp: str = "swiglu"  # "swiglu" or "gelu"
    ffn_hidden_size: int = 11008
    ffn_per_layer: int = 1  # dense FFNs per block (LongCat: 2)
    # --- mixture of experts (n_routed_experts 0 = dense model) -------------------------------------------
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    zero_experts: int = 0  # identity experts: routed to, but no compute and no all-to-all
    moe_topk: int = 0
    expert_ffn_hidden_size: int = 0
    ffn_slots_per_token: float = 0.0  # routed slots landing on FFN experts; 0 = topk * N / (N + Z)
    # "replace": the MoE takes the dense FFN's place (Mixtral, DeepSeek); "shortcut": ScMoE, the MoE
    # runs beside the dense FFNs and joins at the end of the block, so its all-to-all can overlap them.
    moe_style: str = "replace"
    first_dense_layers: int = 0  # leading blocks without MoE (DeepSeek-V3: 3)
    # node-limited routing: each token's experts lie on at most this many scale-up domains (nodes),
    # and it crosses the network once per destination node (DeepSeek-V3: 4 of 8). 0 = no limit.
    route_max_nodes: int = 0
    # --- embeddings -------------------------------------------------------------------------------------
    tied_embeddings: bool = False
    learned_positions: int = 0  # rows of a learned position table (GPT-3: 2048), 0 = RoPE
    ngram_table_params: int = 0  # n-gram hash tables: looked up, never multiplied
    ngram_proj_params: int = 0  # their projections back to hidden_size (a GEMM per token)
    # --- multi-token prediction ---------------------------------------------------------------------------
    mtp_layers: int = 0
    mtp_ffn: str = "dense"  # "dense" (LongCat) or "moe" (DeepSeek-V3)
    # --- details ------------------------------------------------------------------------------------------
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm" (weight + bias)
    bias: bool = False  # linear biases (GPT-2/3)
    dropout: bool = False  # dropout masks are stored for the backward pass (Megatron 2021 GPT)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif kind is int and isinstance(value, float) and value.is_integer():
                setattr(self, f.name, int(value))
            elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"architecture field '{f.name}' must be {kind.__name__}, got {value!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "attn_per_layer"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"architecture field '{name}' must be > 0, got {getattr(self, name)}")
        choices = {"attention": ("gqa", "mla"), "mlp": ("swiglu", "gelu"), "moe_style": ("replace", "shortcut"),
                   "mtp_ffn": ("dense", "moe"), "norm": ("rmsnorm", "layernorm")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"architecture field '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attention == "gqa":
            if self.kv_heads and self.num_heads % self.kv_heads:
                raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})")
        elif self.kv_lora_rank <= 0 or self.qk_nope_head_dim + self.qk_rope_head_dim <= 0 or self.v_head_dim <= 0:
            raise ConfigError("attention = 'mla' needs kv_lora_rank, qk_nope_head_dim/qk_rope_head_dim and v_head_dim")
        if self.is_moe:
            if not 1 <= self.moe_topk <= self.n_routed_experts + self.zero_experts:
                raise ConfigError(f"moe_topk must be in [1, n_routed_experts + zero_experts], got {self.moe_topk}")
            if self.expert_ffn_hidden_size <= 0:
                raise ConfigError("an MoE architecture needs expert_ffn_hidden_size > 0")
            if not 0 <= self.first_dense_layers < self.num_layers:
                raise ConfigError(f"first_dense_layers must be in [0, num_layers), got {self.first_dense_layers}")
        if self.route_max_nodes < 0:
            raise ConfigError(f"route_max_nodes must be >= 0 (0: no node limit), got {self.route_max_nodes}")
        if self.ffn_per_layer < 0 or (not self.is_moe and self.ffn_per_layer == 0):
            raise ConfigError("a dense architecture needs ffn_per_layer >= 1")
        if self.sparse_topk < 0 or (self.index_heads and self.index_head_dim <= 0):
            raise ConfigError("sparse attention needs sparse_topk >= 0 and index_head_dim > 0 with index_heads")

    # --- derived sizes ------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def qk_dim(self) -> int:
        """Per-head query/key size as attention computes it (MLA: expanded nope + rope)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def v_dim(self) -> int:
        if self.attention == "mla":
            return self.v_head_dim
        return self.v_head_dim or self.qk_dim

    @property
    def slots(self) -> float:
        """Routed expert slots per token that land on FFN experts (zero experts cost nothing)."""
        if not self.is_moe:
            return 0.0
        if self.ffn_slots_per_token > 0:
            return self.ffn_slots_per_token
        return self.moe_topk * self.n_routed_experts / (self.n_routed_experts + self.zero_experts)

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def dense_ffns_in_layer(self) -> tuple[int, int]:
        """Dense FFNs in a non-MoE block and in an MoE block."""
        moe_block = self.ffn_per_layer if self.moe_style == "shortcut" else 0
        return max(1, self.ffn_per_layer), moe_block

    # --- parameters --------------------------------------------------------------------------------------
    def _linear(self, n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if self.bias else 0)

    def attention_params(self, with_indexer: bool = False) -> int:
        H, a = self.hidden_size, self.num_heads
        if self.attention == "mla":
            if self.q_lora_rank:
                q = H * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * a * self.qk_dim
            else:
                q = H * a * self.qk_dim
            kv = H * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self.kv_lora_rank * a * (self.qk_nope_head_dim + self.v_head_dim)
            n = q + kv + a * self.v_dim * H
        else:
            d, kvh = self.qk_dim, self.kv_heads
            n = self._linear(H, a * d) + self._linear(H, kvh * d) + self._linear(H, kvh * self.v_dim)
            n += self._linear(a * self.v_dim, H)
        if with_indexer and self.index_heads:
            q_in = self.q_lora_rank or H
            n += q_in * self.index_heads * self.index_head_dim + H * self.index_head_dim + self.index_head_dim
            n += H * self.index_heads
        return n

    def ffn_params(self, inner: int) -> int:
        H = self.hidden_size
        if self.mlp == "swiglu":
            return 3 * H * inner
        return self._linear(H, inner) + self._linear(inner, H)

    @property
    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def layer_params(self, moe: bool, *, active: bool) -> float:
        """One block: attention sublayers, dense FFNs, MoE (routed experts all, or the active slots)."""
        n = 0.0
        for i in range(self.attn_per_layer):
            n += self.attention_params(with_indexer=i < self.indexers_per_layer)
        dense_plain, dense_moe = self.dense_ffns_in_layer
        n += (dense_moe if moe else dense_plain) * self.ffn_params(self.ffn_hidden_size)
        if moe:
            expert = self.ffn_params(self.expert_ffn_hidden_size)
            n += (self.slots if active else self.n_routed_experts) * expert
            n += self.n_shared_experts * expert
            n += self.hidden_size * (self.n_routed_experts + self.zero_experts)  # router
        n += 2 * self.attn_per_layer * self.norm_params
        return n

    def mtp_params(self, *, active: bool) -> float:
        """One MTP depth: two input norms, eh_proj (2H -> H), one block, a final norm."""
        H = self.hidden_size
        n = 2 * self.norm_params + 2 * H * H + self.attention_params() + 3 * self.norm_params
        if self.mtp_ffn == "moe" and self.is_moe:
            expert = self.ffn_params(self.expert_ffn_hidden_size)
            n += (self.slots if active else self.n_routed_experts) * expert
            n += self.n_shared_experts * expert + H * (self.n_routed_experts + self.zero_experts)
        else:
            n += self.ffn_params(self.ffn_hidden_size)
        return n

    def param_counts(self) -> dict[str, float]:
        """Parameters by component (all experts counted; MTP listed separately)."""
        H, V = self.hidden_size, self.vocab_size
        dense_layers = self.num_layers - self.moe_layers
        attention = self.num_layers * sum(
            self.attention_params(with_indexer=i < self.indexers_per_layer) for i in range(self.attn_per_layer)
        )
        dense_plain, dense_moe = self.dense_ffns_in_layer
        expert = self.ffn_params(self.expert_ffn_hidden_size) if self.is_moe else 0
        return {
            "embedding": V * H + self.learned_positions * H,
            "lm_head": 0 if self.tied_embeddings else V * H,
            "ngram": self.ngram_table_params + self.ngram_proj_params,
            "attention": attention,
            "dense_ffn": (dense_layers * dense_plain + self.moe_layers * dense_moe) * self.ffn_params(self.ffn_hidden_size),
            "experts": self.moe_layers * (self.n_routed_experts + self.n_shared_experts) * expert,
            "router": self.moe_layers * H * (self.n_routed_experts + self.zero_experts),
            "norm": self.num_layers * 2 * self.attn_per_layer * self.norm_params + self.norm_params,
            "mtp": self.mtp_layers * self.mtp_params(active=False),
        }

    @property
    def total_params(self) -> float:
        """All parameters without the MTP heads (how model sizes are usually published)."""
        counts = self.param_counts()
        return sum(counts.values()) - counts["mtp"]

    @property
    def active_params(self) -> float:
        """Parameters a token touches in the main model, embeddings included (the usual '37B active')."""
        counts = self.param_counts()
        n = counts["embedding"] + counts["lm_head"] + self.ngram_proj_params + counts["norm"]
        n += (self.num_layers - self.moe_layers) * self.layer_params(False, active=True)
        n += self.moe_layers * self.layer_params(True, active=True)
        return n - self.num_layers * 2 * self.attn_per_layer * self.norm_params  # norms counted once

    # --- FLOPs (forward, per token) ----------------------------------------------------------------------
    def gemm_params_per_token(self, moe: bool) -> float:
        """Matrix parameters one token multiplies in one block (norms and biases excluded)."""
        n = self.layer_params(moe, active=True) - 2 * self.attn_per_layer * self.norm_params
        if self.bias:
            n -= self._layer_bias_params(moe)
        return n

    def _layer_bias_params(self, moe: bool) -> int:
        H, a, kvh = self.hidden_size, self.num_heads, self.kv_heads
        attn = (a * self.qk_dim + kvh * self.qk_dim + kvh * self.v_dim + H) if self.attention == "gqa" else 0
        dense_plain, dense_moe = self.dense_ffns_in_layer
        ffn = (self.ffn_hidden_size + H) if self.mlp == "gelu" else 0
        return self.attn_per_layer * attn + (dense_moe if moe else dense_plain) * ffn

    def mtp_gemm_params_per_token(self) -> float:
        return self.mtp_params(active=True) - 5 * self.norm_params

    @staticmethod
    def mean_context(seq_len: int, budget: int, causal: bool) -> float:
        """Keys one query attends to on average: S (non-causal), (S+1)/2 (causal), capped by a budget."""
        if not causal:
            return float(min(seq_len, budget) if budget else seq_len)
        if not budget or seq_len <= budget:
            return (seq_len + 1) / 2
        # sum_{t=1..S} min(t, k) / S
        return (budget * (budget + 1) / 2 + (seq_len - budget) * budget) / seq_len

    def attention_core_flops(self, seq_len: int, causal: bool) -> float:
        """Forward QK^T and AV FLOPs per token for one block, plus the indexer's scoring."""
        keys = self.mean_context(seq_len, self.sparse_topk, causal)
        flops = self.attn_per_layer * 2 * keys * self.num_heads * (self.qk_dim + self.v_dim)
        if self.index_heads:
            scored = self.mean_context(seq_len, 0, causal)  # the indexer scores every past key
            flops += self.indexers_per_layer * 2 * scored * self.index_heads * (self.index_head_dim + 1)
        return flops

    def lsa_dense_runtime(self, seq_len: int) -> dict[str, float]:
        """Per token and block, what LSA training costs on a runtime without a sparse attention
        kernel (`Stack.sparse_attention_kernel` False: `longcat train`, model/attention.py), forward:

        - `causal_flops` / `masked_flops`: the attention's QK^T + AV. Once a query can see more
          than `sparse_topk` keys the selection is a (query, key) keep-mask given to dense SDPA,
          which computes every key of the sequence (the mask is arbitrary, so no block is skipped
          as a causal kernel skips the future); otherwise causal SDPA.
        - `index_flops`: the indexer's fp32 scores of every query against every key (the whole
          rectangle, masked afterwards), differentiable: the backward runs twice these FLOPs.
        - `target_flops`: the indexer's KL target, the main attention's probabilities recomputed
          in fp32 over the latents (absorbed: kv_lora_rank + rope dims per head), no gradient.
        - `traffic_fwd` / `traffic_bwd` / `saved`: bytes per token of the (query, key)-sized
          tensors these make, op by op as eager PyTorch runs them (so not scaled again by the
          stack's element-wise passes):
          index logits (h_i fp32: write, relu read + write, head-sum read) and scores (write):
          16 h_i + 4; the causal mask: 2; the selection (select_tokens: two masked copies, top-k,
          two comparisons, a cumsum, the keep-mask): 40; the mask read by SDPA per head: a;
          the target's per-head fp32 logits (two products, add, scale, mask, softmax, head sum):
          52 a; the KL (log-softmax of the masked scores, log of the target, product, where, sum):
          100. Backward: the index logits' gradients 20 h_i + 4, the mask per head a, the KL's
          gradient to the scores 60. Saved: relu'd logits 4 h_i, log-probabilities, target and
          three masks 11, beyond the scores `layer_tensors` counts.
        Zero without an indexer.
        """
        out = dict.fromkeys(("causal_flops", "masked_flops", "index_flops", "target_flops",
                             "traffic_fwd", "traffic_bwd", "saved"), 0.0)
        if not self.index_heads:
            return out
        S, a, hi = seq_len, self.num_heads, self.index_heads
        per_key = 2 * a * (self.qk_dim + self.v_dim)
        if self.sparse_topk and S > self.sparse_topk:
            out["masked_flops"] = self.attn_per_layer * per_key * S
        else:
            out["causal_flops"] = self.attn_per_layer * per_key * (S + 1) / 2
        n = self.indexers_per_layer
        out["index_flops"] = n * 2 * S * hi * (self.index_head_dim + 1)
        latent = (self.kv_lora_rank + self.qk_rope_head_dim) if self.attention == "mla" else self.qk_dim
        out["target_flops"] = n * 2 * S * a * latent
        out["traffic_fwd"] = n * S * (16 * hi + 4 + 2 + 40 + a + 52 * a + 100)
        out["traffic_bwd"] = n * S * (20 * hi + 4 + a + 60)
        out["saved"] = n * S * (4 * hi + 11)
        return out

    def mtp_attention_core_flops(self, seq_len: int, causal: bool, sparse: bool = True) -> float:
        keys = self.mean_context(seq_len, self.sparse_topk if sparse else 0, causal)
        return 2 * keys * self.num_heads * (self.qk_dim + self.v_dim)

    def head_gemm_params(self) -> int:
        """Output projection(s): the main head plus one per MTP depth (the head is shared)."""
        return (1 + self.mtp_layers) * self.vocab_size * self.hidden_size

    def flops_per_token(self, seq_len: int, causal: bool = True, *, training: bool = True) -> dict[str, float]:
        """Forward FLOPs per token by part. x3 for a training step (forward + backward)."""
        dense_layers = self.num_layers - self.moe_layers
        layers = 2 * (dense_layers * self.gemm_params_per_token(False) + self.moe_layers * self.gemm_params_per_token(True))
        out = {
            "layers_gemm": layers + 2 * self.ngram_proj_params,
            "attention_core": self.num_layers * self.attention_core_flops(seq_len, causal),
            "head": 2 * self.vocab_size * self.hidden_size,
            "mtp": 0.0,
        }
        if training and self.mtp_layers:
            out["mtp"] = self.mtp_layers * (
                2 * self.mtp_gemm_params_per_token() + self.mtp_attention_core_flops(seq_len, causal)
                + 2 * self.vocab_size * self.hidden_size
            )
        return out

    # --- memory per token of one block ---------------------------------------------------------------------
    def layer_tensors(self, moe: bool, seq_len: int, *, flash: bool, mtp: bool = False, residual_bytes: int = 2,
                      eager: bool = False, fp8_cache: bool = False, expert_padding: float | None = None) -> "LayerTensors":
        """Saved activations and element-wise traffic of one block (bytes per token, forward).

        Korthikanti et al. 2022 (GPT, no flash, dropout) gives 34*H + 5*a*S bytes saved per token
        and layer; this generalises the same bookkeeping to GQA, MLA, SwiGLU, MoE and the indexer.
        'rep' tensors sit outside the tensor-parallel region (split only by sequence parallelism),
        'par' ones are split over TP ranks, 's2' ones scale with the attended context and exist only
        without a fused (flash) attention kernel. `residual_bytes` is the element size of the
        residual stream and the norms (2 in bf16 training, 4 under autocast with fp32 weights);
        GEMM outputs are bf16 either way.

        `eager` counts what op-by-op autograd keeps on top of fused kernels (found by listing the
        saved tensors of this repository's model with torch.autograd.graph.saved_tensors_hooks):
        SwiGLU's silu output, the combine scatter-add's source rows, and, when the residual stream
        is fp32 under autocast, the bf16 copy of its input that each consuming GEMM casts and keeps.

        `fp8_cache` is DeepSeek-V3's FP8 recipe (tech report §3.3.2): the GEMM inputs kept for the
        backward (norm outputs, the attention output before o_proj, the experts' dispatched rows)
        are stored in e4m3 with one fp32 scale per 128 values, and the experts' SwiGLU keeps its
        two inputs in FP8 and recomputes its product.

        `expert_padding` (a share of the rows, None when rows are not padded): each expert's rows
        padded with zeros to a bucketed count (Stack.expert_row_buckets): the experts' GEMM inputs
        and intermediates grow by that share (the copy into the padded buffer keeps only its index).

        `LayerTensors.light` records what recomputing only the norms and the MLA up-projections
        (recompute=norm_up, DeepSeek-V3 §3.2.3) drops: every norm output and the per-head q, k, v
        the up-projections expand from the latents.
        """
        H, a, S = self.hidden_size, self.num_heads, seq_len
        r = residual_bytes
        g = (1 + 4 / 128) if fp8_cache else 2  # bytes per element of a cached GEMM input
        gin = g if fp8_cache else r  # a norm output is the next GEMM's input
        t = LayerTensors()
        drop = 1 if self.dropout else 0
        attn_keys = min(S, self.sparse_topk) if self.sparse_topk else S
        attn_sublayers = 1 if mtp else self.attn_per_layer
        for i in range(attn_sublayers):
            # pre-norm input and output (the QKV GEMM input)
            t.add("rep", saved=r * H + gin * H, traffic=2 * r * H)
            t.light["rep"] += gin * H
            if eager and r != 2:  # q/kv (MLA: q_a, kv_a; GQA: q, k, v) each keep a bf16 cast of the input
                t.add("rep", saved=(2 if self.attention == "mla" else 3) * 2 * H, traffic=0)
            if self.attention == "mla":
                lat = self.q_lora_rank + self.kv_lora_rank
                # the latents (norm inputs) and their normed copies (the up-projections' inputs)
                t.add("rep", saved=2 * (self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim) + g * lat,
                      traffic=4 * lat)
                t.light["rep"] += g * lat
            qkv = 2 * a * self.qk_dim + 2 * (a if self.attention == "mla" else self.kv_heads) * (self.qk_dim + self.v_dim)
            t.add("par", saved=qkv, traffic=4 * (a + self.kv_heads) * (self.qk_rope_head_dim or self.qk_dim))  # RoPE on q and k
            if self.attention == "mla":
                t.light["par"] += qkv  # the up-projections' outputs
            t.add("par", saved=g * a * self.v_dim + 4 * a, traffic=0)  # attention output (+ softmax stats)
            if not flash:
                # softmax output (2aS) [+ dropout mask aS and dropout output 2aS]; scale-mask-softmax
                # reads and writes the scores, dropout reads the probabilities and writes both.
                t.add("s2", saved=(2 + 3 * drop) * a * attn_keys, traffic=(4 + 5 * drop) * a * attn_keys)
            if self.index_heads and i < self.indexers_per_layer and not mtp:
                idx = self.index_heads * self.index_head_dim
                t.add("par", saved=2 * idx + 2 * self.index_head_dim + 4 * self.index_heads, traffic=0)
                # index scores over every past key (fp32), then a top-k over them, even with fused kernels
                t.add("idx", saved=4 * S, traffic=8 * S)
            t.add("rep", saved=drop * H, traffic=(3 * r + drop) * H)  # residual add (+ dropout)
        dense_plain, dense_moe = self.dense_ffns_in_layer
        n_dense = 1 if mtp and not (moe and self.mtp_ffn == "moe") else (dense_moe if moe else dense_plain)
        for _ in range(n_dense):
            t.add("rep", saved=r * H + gin * H + drop * H, traffic=(5 * r + drop) * H)  # norm in/out, residual
            t.light["rep"] += gin * H
            if eager and r != 2:  # gate and up (GELU: fc1) each keep a bf16 cast of the input
                t.add("rep", saved=(2 if self.mlp == "swiglu" else 1) * 2 * H, traffic=0)
            t.add("par", **self._ffn_tensors(self.ffn_hidden_size, eager))
        if moe:
            E = self.n_routed_experts + self.zero_experts
            slots = self.slots
            if self.moe_style == "replace":
                t.add("rep", saved=r * H + gin * H, traffic=5 * r * H)  # its own pre-norm and residual
                t.light["rep"] += gin * H
            else:
                t.add("rep", saved=0, traffic=3 * r * H)  # the delayed join adds one more residual term
            # router logits and probabilities in fp32; softmax + top-k
            t.add("exp", saved=8 * E, traffic=12 * E)
            # each FFN slot: the permuted input and the expert output (kept for the weighted combine),
            # plus the expert's own intermediates; the permute gathers rows from the residual-stream
            # tensor, the combine weights the bf16 outputs and scatter-adds them back.
            ffn = self._ffn_tensors(self.expert_ffn_hidden_size, eager)
            if fp8_cache and self.mlp == "swiglu":
                ffn["saved"] = 2 * g * self.expert_ffn_hidden_size  # gate and up in FP8; the product recomputed
            combine_source = r * H if eager else 0  # autograd keeps index_add's source rows
            pad = 1 + (expert_padding or 0.0)
            t.add("exp", saved=slots * (pad * (g * H + ffn["saved"]) + 2 * H + combine_source),
                  traffic=slots * ((2 * r + 6) * H + ffn["traffic"]))
            for _ in range(self.n_shared_experts):
                t.add("par", **self._ffn_tensors(self.expert_ffn_hidden_size, eager))
        return t

    def _ffn_tensors(self, inner: int, eager: bool = False) -> dict[str, float]:
        if self.mlp == "swiglu":  # gate, up, silu(gate)*up (the down-projection input) [+ silu(gate)]
            return {"saved": (8 if eager else 6) * inner, "traffic": 6 * inner}
        return {"saved": 4 * inner, "traffic": 4 * inner}  # GELU input and output (bias fused)

    def kv_bytes_per_token(self, dtype_bytes: float = 2, *, tp: int = 1) -> float:
        """Decode cache per token over all attention sublayers on one device (MTP excluded).

        MLA caches the latent (kv_lora + rope), which every TP rank needs whole; GQA caches K and V
        per KV head, split over TP ranks while there are enough heads. The indexer keeps one key
        per token per indexer."""
        sub = self.num_layers * self.attn_per_layer
        if self.attention == "mla":
            per = sub * (self.kv_lora_rank + self.qk_rope_head_dim)
        else:
            heads = max(1, self.kv_heads // tp) if self.kv_heads >= tp else 1
            per = sub * heads * (self.qk_dim + self.v_dim)
        if self.index_heads:
            per += self.num_layers * self.indexers_per_layer * self.index_head_dim
        return per * dtype_bytes

    # --- conversion ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        kind = "MoE" if self.is_moe else "dense"

        def size(n: float) -> str:
            return f"{n / 1e9:,.1f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"

        return (f"{self.name}: {size(self.total_params)} parameters ({kind}, {size(self.active_params)} active), "
                f"{self.num_layers} layers, hidden {self.hidden_size}")


@dataclass
class LayerTensors:
    """Per-token bytes of one block, by how they split across devices (see `layer_tensors`)."""

    saved: dict[str, float] = dataclasses.field(default_factory=lambda: {"rep": 0.0, "par": 0.0, "s2": 0.0, "idx": 0.0, "exp": 0.0})
    light: dict[str, float] = dataclasses.field(default_factory=lambda: {"rep": 0.0, "par": 0.0})  # dropped by recompute=norm_up
    traffic: dict[str, float] = dataclasses.field(default_factory=lambda: {"rep": 0.0, "par": 0.0, "s2": 0.0, "idx": 0.0, "exp": 0.0})

    def add(self, kind: str, *, saved: float, traffic: float) -> None:
        self.saved[kind] += saved
        self.traffic[kind] += traffic


# ------------------------------------------------------------------------------------------------------
# sources: LongCat presets, planner TOML files, LongCat model configs


def from_longcat(config: ModelConfig, name: str = "longcat") -> Architecture:
    """A LongCat ModelConfig (two MLA sublayers, two dense FFNs and a shortcut MoE per block)."""
    c = config
    ngram_tables = ngram_proj = 0
    if c.ngram_enabled:
        from ..model.ngram import branch_moduli

        width = c.hidden_size // c.ngram_branches
        ngram_tables = sum(m * width for m in branch_moduli(c))
        ngram_proj = c.ngram_branches * width * c.hidden_size
    return Architecture(
        name=name, source="longcat.config preset / ModelConfig",
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers,
        attention="mla", num_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, attn_per_layer=2,
        sparse_topk=c.index_topk if c.lsa_enabled else 0,
        index_heads=c.index_n_heads if c.lsa_enabled else 0,
        index_head_dim=c.index_head_dim if c.lsa_enabled else 0, indexers_per_layer=1,
        mlp="swiglu", ffn_hidden_size=c.ffn_hidden_size, ffn_per_layer=2,
        n_routed_experts=c.n_routed_experts, zero_experts=c.zero_expert_num, moe_topk=c.moe_topk,
        expert_ffn_hidden_size=c.expert_ffn_hidden_size, ffn_slots_per_token=c.ffn_slots_per_token,
        moe_style="shortcut", tied_embeddings=False,
        ngram_table_params=ngram_tables, ngram_proj_params=ngram_proj,
        mtp_layers=c.mtp_num_layers, mtp_ffn="dense", norm="rmsnorm",
    )


def from_dict(values: dict[str, Any], *, source: str) -> Architecture:
    known = {f.name for f in fields(Architecture)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown architecture field(s) in {source}: {', '.join(unknown)}; "
                          f"valid fields: {', '.join(sorted(known))}")
    return Architecture(**values)


def load_architecture(spec: str) -> Architecture:
    """A LongCat preset, a name in the planner catalog (longcat/catalog/plan/), or a TOML file:
    either a planner file (an [arch] table) or a LongCat model config ([model] table, our
    config.json, an HF config.json)."""
    if spec in PRESETS:
        return from_longcat(preset(spec), name=spec)
    path = Path(spec)
    if not path.exists():
        names = catalog_names("plan")
        if spec in names:
            path = catalog_dir("plan") / f"{spec}.toml"
        else:
            raise ConfigError(
                f"model '{spec}' is not a LongCat preset ({', '.join(PRESETS)}), a planner example "
                f"({', '.join(names) or 'none found'}) or an existing file"
            )
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"cannot parse {path}: {exc}") from exc
        if "arch" in data:
            values = dict(data["arch"])
            values.setdefault("name", data.get("name", path.stem))
            values.setdefault("source", data.get("source", str(path)))
            if "preset" in values:  # a LongCat preset with planner-level overrides
                base = from_longcat(preset(values.pop("preset")), name=values["name"]).to_dict()
                return from_dict({**base, **values}, source=str(path))
            return from_dict(values, source=str(path))
    return from_longcat(load_config(path), name=path.stem)


__all__ = ["Architecture", "LayerTensors", "from_longcat", "load_architecture"]
