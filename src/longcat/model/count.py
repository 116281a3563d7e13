"""Parameter and memory accounting from the config alone (instant, even for 1.6T).

`tests/test_count.py` checks these formulas against a model built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from .ngram import branch_moduli


@dataclass
class ParamCount:
    by_component: dict[str, int]
    expert_slot_params_per_layer: int  # one SwiGLU expert
    base_active_params: int  # parameters every token uses, whatever the routing
    active_params: float  # base + expected FFN slots * expert slot * layers
    ffn_slots_per_token: float

    @property
    def total(self) -> int:
        return sum(self.by_component.values())


def mla_params(c: ModelConfig, with_indexer: bool = False) -> int:
    n = (
        c.hidden_size * c.q_lora_rank + c.q_lora_rank  # q_a_proj + q_a_layernorm
        + c.q_lora_rank * c.num_attention_heads * c.qk_head_dim  # q_b_proj
        + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # kv_a + norm
        + c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
        + c.num_attention_heads * c.v_head_dim * c.hidden_size  # o_proj
    )
    if with_indexer:
        n += (
            c.q_lora_rank * c.index_n_heads * c.index_head_dim  # wq_b
            + c.hidden_size * c.index_head_dim + c.index_head_dim  # wk + k_norm
            + c.hidden_size * c.index_n_heads  # weights_proj
        )
    return n


def count_parameters(c: ModelConfig) -> ParamCount:
    H, L = c.hidden_size, c.num_layers
    dense_ffn = 3 * H * c.ffn_hidden_size
    expert = 3 * H * c.expert_ffn_hidden_size
    ngram = 0
    ngram_proj = 0
    if c.ngram_enabled:
        width = H // c.ngram_branches
        ngram = sum(m * width for m in branch_moduli(c))
        ngram_proj = c.ngram_branches * width * H
    mtp = c.mtp_num_layers * (
        2 * H  # enorm, hnorm
        + 2 * H * H  # eh_proj
        + mla_params(c) + dense_ffn
        + 3 * H  # input, post-attention and final norms
    )
    by = {
        "embedding": 2 * c.vocab_size * H,  # input table + untied output head
        "ngram": ngram + ngram_proj,
        "attention": L * (mla_params(c, with_indexer=c.lsa_enabled) + mla_params(c)),
        "dense_ffn": L * 2 * dense_ffn,
        "experts": L * c.n_routed_experts * expert,
        "router": L * H * c.num_experts_total,
        "mtp": mtp,
        "norm": L * 4 * H + H,
    }
    # Active per token: everything but the experts, the n-gram tables (lookups, not compute) and
    # the MTP heads (training/drafting only), plus the FFN-expert slots a token actually uses.
    base = by["embedding"] + ngram_proj + by["attention"] + by["dense_ffn"] + by["router"] + by["norm"]
    slots = c.ffn_slots_per_token
    return ParamCount(
        by_component=by,
        expert_slot_params_per_layer=expert,
        base_active_params=base,
        active_params=base + slots * expert * L,
        ffn_slots_per_token=slots,
    )


def kv_cache_bytes_per_token(c: ModelConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """Latent MLA cache vs an expanded per-head cache, all 2*L sublayers (MTP excluded)."""
    sublayers = 2 * c.num_layers
    latent = sublayers * (c.kv_lora_rank + c.qk_rope_head_dim)
    if c.lsa_enabled:
        latent += c.num_layers * c.index_head_dim
    expanded = sublayers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    return {"latent": latent * dtype_bytes, "expanded": expanded * dtype_bytes}
