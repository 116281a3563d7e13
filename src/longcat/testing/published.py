"""Tiny checkpoints written exactly as the published LongCat families are (DESIGN §8).

No published weights can be downloaded in CI, so this writes small ones with the published names,
dtypes, FP8 block grids and config keys. The key names are spelled out here, independently of the
loader's mapping (interop/hf.py), so a test that loads these checks the mapping rather than
agreeing with itself:

- "flash":        LongCat-Flash-Chat: `LongcatFlashForCausalLM`, config.json without model_type,
                  one key per real expert, one MTP layer under `model.mtp.*` (`enorm.m`/`hnorm.m`,
                  `transformer_layer.mlp`, `model.mtp.norm`, `model.mtp.embed_tokens`).
- "flash-fp8":    the same in FP8: e4m3 projection and expert weights with fp32 `weight_scale_inv`
                  per 128x128 block (ceil grid, partial last block), `quantization_config` with
                  `ignored_layers`; embeddings, lm_head, norms and the router stay bf16.
- "flash-lite":   LongCat-Flash-Lite: `LongcatFlashNgramForCausalLM`, nested n-gram keys
                  `model.ngram_embeddings.{embedders,post_projs}.{b}`, config ngram_vocab_size_ratio /
                  emb_neighbor_num / emb_split_num, YaRN.
- "longcat2":     LongCat-2.0: `LongcatCausalLM`, model_type null, flat `model.oe_embed_tokens{b}` /
                  `oe_embed_proj{b}`, config oe_* keys, LSA indexer on `self_attn.0`, 3 MTP layers,
                  rope_scaling `deepseek_yarn`.
- "longcat2-fp8": LongCat-2.0 in FP8 with `modules_to_not_convert` (the indexer stays bf16 here, so
                  a reader must take each tensor's dtype from its header).

Dimensions are deliberately not multiples of 128 (hidden 192, expert FFN 136, kv_a 80 rows), so FP8
grids have partial blocks; the files are sharded with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..interop.safetensors_io import write_sharded
from ..model.fp8 import quantize_blockwise

FIXTURE_FAMILIES = ("flash", "flash-fp8", "flash-lite", "longcat2", "longcat2-fp8")

_ARCH = {"flash": "LongcatFlashForCausalLM", "flash-lite": "LongcatFlashNgramForCausalLM", "longcat2": "LongcatCausalLM"}
# The linears the published FP8 checkpoints store in e4m3.
_FP8_LEAVES = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj", "eh_proj", "wq_b", "wk"}

_TINY = {
    "vocab_size": 512, "hidden_size": 192, "ffn_hidden_size": 160, "expert_ffn_hidden_size": 136, "num_layers": 2,
    "num_attention_heads": 2, "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32,
    "v_head_dim": 32, "n_routed_experts": 4, "zero_expert_num": 2, "zero_expert_type": "identity", "moe_topk": 2,
    "routed_scaling_factor": 6.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000000.0,
    "mla_scale_q_lora": True, "mla_scale_kv_lora": True, "router_bias": False, "attention_method": "MLA",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "initializer_range": 0.006, "attention_bias": False, "tie_word_embeddings": False, "use_cache": True,
}


def _base(family: str) -> str:
    return family.removesuffix("-fp8")


def published_config(family: str, **overrides) -> dict:
    """The config.json of a tiny checkpoint of `family` (FIXTURE_FAMILIES), keys as published."""
    if family not in FIXTURE_FAMILIES:
        raise ValueError(f"unknown fixture family {family!r}; choose one of {', '.join(FIXTURE_FAMILIES)}")
    base = _base(family)
    cfg = {"architectures": [_ARCH[base]],
           "auto_map": {"AutoConfig": "configuration_longcat.LongcatConfig",
                        "AutoModelForCausalLM": f"modeling_longcat.{_ARCH[base]}"},
           **_TINY}
    if base == "flash-lite":
        cfg.update(ngram_vocab_size_ratio=2.0, emb_neighbor_num=3, emb_split_num=2, rope_theta=5000000.0,
                   rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    elif base == "longcat2":
        cfg.update(model_type=None, routed_scaling_factor=9.0, rope_theta=1000000.0,
                   oe_vocab_size_ratio=2.5, oe_neighbor_num=3, oe_split_num=3, oe_embed_dim=32,
                   index_n_heads=2, index_head_dim=32, index_topk=24, index_k_norm_type="rmsnorm",
                   index_init_tokens=4, index_local_tokens=8,
                   rope_scaling={"rope_type": "deepseek_yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    cfg.update(overrides)
    return cfg


def _mtp_layers(family: str) -> int:
    return 3 if _base(family) == "longcat2" else 1


def _attention(prefix: str, c: dict, indexer: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    H, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    yield f"{prefix}.q_a_proj.weight", (c["q_lora_rank"], H)
    yield f"{prefix}.q_a_layernorm.weight", (c["q_lora_rank"],)
    yield f"{prefix}.q_b_proj.weight", (heads * (nope + rope), c["q_lora_rank"])
    yield f"{prefix}.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + rope, H)
    yield f"{prefix}.kv_a_layernorm.weight", (c["kv_lora_rank"],)
    yield f"{prefix}.kv_b_proj.weight", (heads * (nope + v), c["kv_lora_rank"])
    yield f"{prefix}.o_proj.weight", (H, heads * v)
    if indexer:
        yield f"{prefix}.indexer.wq_b.weight", (c["index_n_heads"] * c["index_head_dim"], c["q_lora_rank"])
        yield f"{prefix}.indexer.wk.weight", (c["index_head_dim"], H)
        yield f"{prefix}.indexer.k_norm.weight", (c["index_head_dim"],)
        yield f"{prefix}.indexer.weights_proj.weight", (c["index_n_heads"], H)


def _dense_ffn(prefix: str, H: int, inner: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}.gate_proj.weight", (inner, H)
    yield f"{prefix}.up_proj.weight", (inner, H)
    yield f"{prefix}.down_proj.weight", (H, inner)


def published_shapes(family: str, c: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(published key, shape) of every tensor a checkpoint of `family` with config `c` holds."""
    base = _base(family)
    H, V, N, Z = c["hidden_size"], c["vocab_size"], c["n_routed_experts"], c["zero_expert_num"]
    yield "model.embed_tokens.weight", (V, H)
    if base in ("flash-lite", "longcat2"):
        ratio = c.get("ngram_vocab_size_ratio", c.get("oe_vocab_size_ratio"))
        n = c.get("emb_neighbor_num", c.get("oe_neighbor_num"))
        k = c.get("emb_split_num", c.get("oe_split_num"))
        branches = k * (n - 1)
        width = H // branches
        for b in range(branches):
            rows = int(ratio * V) + 2 * b + 1
            if base == "longcat2":
                yield f"model.oe_embed_tokens{b}.weight", (rows, width)
                yield f"model.oe_embed_proj{b}.weight", (H, width)
            else:
                yield f"model.ngram_embeddings.embedders.{b}.weight", (rows, width)
                yield f"model.ngram_embeddings.post_projs.{b}.weight", (H, width)
    for i in range(c["num_layers"]):
        p = f"model.layers.{i}"
        for s in range(2):
            yield from _attention(f"{p}.self_attn.{s}", c, indexer=(base == "longcat2" and s == 0))
            yield f"{p}.input_layernorm.{s}.weight", (H,)
            yield f"{p}.post_attention_layernorm.{s}.weight", (H,)
            yield from _dense_ffn(f"{p}.mlps.{s}", H, c["ffn_hidden_size"])
        yield f"{p}.mlp.router.classifier.weight", (N + Z, H)
        yield f"{p}.mlp.router.e_score_correction_bias", (N + Z,)
        for j in range(N):  # identity experts have no tensors
            yield from _dense_ffn(f"{p}.mlp.experts.{j}", H, c["expert_ffn_hidden_size"])
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)
    depths = _mtp_layers(family)
    yield "model.mtp.embed_tokens.weight", (V, H)
    for d in range(depths):
        p = f"model.mtp.layers.{d}"
        yield f"{p}.enorm.m.weight", (H,)
        yield f"{p}.hnorm.m.weight", (H,)
        yield f"{p}.eh_proj.weight", (H, 2 * H)
        yield f"{p}.input_layernorm.weight", (H,)
        yield f"{p}.post_attention_layernorm.weight", (H,)
        yield from _attention(f"{p}.self_attn", c, indexer=False)
        yield from _dense_ffn(f"{p}.transformer_layer.mlp", H, c["ffn_hidden_size"])
        yield ("model.mtp.norm.weight" if d == 0 else f"{p}.norm.weight"), (H,)


def _kept_bf16(family: str, key: str) -> bool:
    """Weights an FP8 fixture keeps in bf16 although they are linears the format could quantize."""
    return family == "longcat2-fp8" and ".indexer." in key


def published_tensors(family: str, c: dict, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights (bf16; FP8 families: e4m3 + weight_scale_inv where published) under the
    published keys. Deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    fp8 = family.endswith("-fp8")
    embedding = None
    for key, shape in published_shapes(family, c):
        if key == "model.mtp.embed_tokens.weight":
            yield key, embedding  # the published MTP carries a copy of the word embedding
            continue
        if len(shape) == 1:
            if key.endswith("e_score_correction_bias"):
                t = torch.randn(shape, generator=gen) * 0.02
            else:
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(shape[-1]))
        leaf = key.split(".")[-2]
        if fp8 and leaf in _FP8_LEAVES and not _kept_bf16(family, key):
            q, scale = quantize_blockwise(t)
            yield key, q
            yield key[: -len("weight")] + "weight_scale_inv", scale
        else:
            t = t.to(torch.bfloat16)
            if key == "model.embed_tokens.weight":
                embedding = t
            yield key, t


def _quantization_config(family: str, c: dict) -> dict:
    kept = sorted({k[: -len(".weight")] for k, shape in published_shapes(family, c)
                   if len(shape) == 2 and (k.split(".")[-2] not in _FP8_LEAVES or _kept_bf16(family, k))})
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    q["ignored_layers" if _base(family) == "flash" else "modules_to_not_convert"] = kept
    return q


def _experts_for(family: str, c: dict, target_bytes: int) -> int:
    """Real experts that bring a checkpoint of `family` to about `target_bytes`."""
    per_expert = 3 * c["hidden_size"] * c["expert_ffn_hidden_size"] * c["num_layers"]
    per_expert *= 1 if family.endswith("-fp8") else 2
    fixed = sum(math.prod(s) * 2 for k, s in published_shapes(family, {**c, "n_routed_experts": 1, "zero_expert_num": 0})
                if ".experts." not in k)
    return max(1, (target_bytes - fixed) // per_expert)


def write_published(path: str | os.PathLike, family: str, *, seed: int = 0, max_shard_bytes: int = 1 << 20,
                    target_bytes: int | None = None, **overrides) -> Path:
    """Write a checkpoint of `family` (FIXTURE_FAMILIES) to `path`: config.json, safetensors shards
    and model.safetensors.index.json. `overrides` replace config.json keys; `target_bytes` sizes the
    number of real experts so the weights come to about that many bytes (for memory tests)."""
    path = Path(path)
    c = published_config(family, **overrides)
    if target_bytes is not None:
        c["n_routed_experts"] = int(_experts_for(family, c, target_bytes))
        c["zero_expert_num"] = max(1, c["n_routed_experts"] // 2)
        c["moe_topk"] = min(c["moe_topk"], c["n_routed_experts"])
    if family.endswith("-fp8"):
        c["quantization_config"] = _quantization_config(family, c)
    path.mkdir(parents=True, exist_ok=True)
    write_sharded(published_tensors(family, c, seed), path, max_shard_bytes=max_shard_bytes)
    (path / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    return path


__all__ = ["FIXTURE_FAMILIES", "published_config", "published_shapes", "published_tensors", "write_published"]
