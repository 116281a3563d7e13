"""Model configuration: one dataclass, named presets, TOML/JSON files and Hugging Face config.json.

Every field the architecture needs lives in `ModelConfig`. Presets are plain instances; files and
command-line overrides replace fields by name. Unknown or ill-typed fields raise `ConfigError`
naming the field, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type. The message names the field."""


@dataclass
class ModelConfig:
    """The LongCat-2.0 / LongCat-Flash architecture (DESIGN §2). Field names follow the HF config."""

    # --- sizes -----------------------------------------------------------------------------------
    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28  # each layer holds two attention sublayers
    num_attention_heads: int = 64
    # --- multi-head latent attention ---------------------------------------------------------
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- dense FFNs and MoE ----------------------------------------------------------------------
    ffn_hidden_size: int = 12288
    n_routed_experts: int = 512
    zero_expert_num: int = 256
    moe_topk: int = 12
    expert_ffn_hidden_size: int = 2048
    routed_scaling_factor: float = 6.0
    # The zero-expert budget K_e: how many of the moe_topk slots should land on FFN experts on
    # average. The trainer's router-bias update aims for it and `longcat info` counts active
    # parameters with it. 0 means the uniform share moe_topk * N / (N + Z).
    expected_ffn_experts_per_token: float = 0.0
    # --- norms ------------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-5
    # The latent norms (q_a_layernorm, kv_a_layernorm) use 1e-6 in the transformers reference.
    mla_norm_eps: float = 1e-6
    # --- positions: RoPE with optional YaRN (yarn_factor 1.0 = off) ----------------------------------
    rope_theta: float = 1e7
    max_position_embeddings: int = 131072
    yarn_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 1.0
    # --- n-gram embedding (oe_vocab_size_ratio 0 = off) ----------------------------------------------
    oe_vocab_size_ratio: float = 0.0
    oe_neighbor_num: int = 0  # n_max: the longest n-gram order
    oe_split_num: int = 0  # K: hash tables per order
    # Divide the word embedding by (1+B) together with the n-gram branches (ports differ).
    oe_scale_word_embedding: bool = True
    # --- LongCat sparse attention (index_n_heads 0 = dense attention) ---------------------------------
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 2048
    index_init_tokens: int = 16
    index_local_tokens: int = 1024
    # --- multi-token prediction -----------------------------------------------------------------------
    mtp_num_layers: int = 0
    # --- tokens and init --------------------------------------------------------------------------------
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check field types and the relations between fields; raise ConfigError naming the field."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            expected = hints[f.name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if expected is int and isinstance(value, float) and value.is_integer():
                setattr(self, f.name, int(value))
                continue
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise ConfigError(
                    f"model config field '{f.name}' must be {expected.__name__}, got {value!r} "
                    f"({type(value).__name__})"
                )
        positive = [
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "q_lora_rank",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size",
            "expert_ffn_hidden_size", "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config field '{name}' must be > 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"'qk_rope_head_dim' must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.n_routed_experts < 1:
            raise ConfigError(f"'n_routed_experts' must be >= 1, got {self.n_routed_experts}")
        if self.zero_expert_num < 0:
            raise ConfigError(f"'zero_expert_num' must be >= 0, got {self.zero_expert_num}")
        if not 1 <= self.moe_topk <= self.n_routed_experts + self.zero_expert_num:
            raise ConfigError(
                f"'moe_topk' must be between 1 and n_routed_experts + zero_expert_num "
                f"({self.n_routed_experts + self.zero_expert_num}), got {self.moe_topk}"
            )
        if not 0 <= self.expected_ffn_experts_per_token <= min(self.moe_topk, self.n_routed_experts):
            raise ConfigError(
                f"'expected_ffn_experts_per_token' must be between 0 and moe_topk ({self.moe_topk}), "
                f"got {self.expected_ffn_experts_per_token}"
            )
        if self.yarn_factor < 1.0:
            raise ConfigError(f"'yarn_factor' must be >= 1.0 (1.0 disables YaRN), got {self.yarn_factor}")
        if self.yarn_enabled and self.yarn_original_max_position_embeddings <= 0:
            raise ConfigError(
                "'yarn_original_max_position_embeddings' must be set (> 0) when yarn_factor > 1"
            )
        if self.ngram_enabled:
            if self.oe_neighbor_num < 2 or self.oe_split_num < 1:
                raise ConfigError(
                    "n-gram embedding needs 'oe_neighbor_num' >= 2 and 'oe_split_num' >= 1 "
                    f"(got {self.oe_neighbor_num}, {self.oe_split_num}); set oe_vocab_size_ratio = 0 to disable it"
                )
            if self.hidden_size % self.ngram_branches:
                raise ConfigError(
                    f"'hidden_size' ({self.hidden_size}) must be divisible by the number of n-gram branches "
                    f"oe_split_num*(oe_neighbor_num-1) = {self.ngram_branches}"
                )
        elif self.oe_vocab_size_ratio < 0:
            raise ConfigError(f"'oe_vocab_size_ratio' must be >= 0, got {self.oe_vocab_size_ratio}")
        if self.lsa_enabled:
            if self.index_head_dim < self.qk_rope_head_dim or self.index_head_dim % 2:
                raise ConfigError(
                    f"'index_head_dim' ({self.index_head_dim}) must be even and >= qk_rope_head_dim "
                    f"({self.qk_rope_head_dim}): RoPE covers the first qk_rope_head_dim index dims"
                )
            if self.index_topk < self.index_init_tokens + self.index_local_tokens:
                raise ConfigError(
                    f"'index_topk' ({self.index_topk}) must be >= index_init_tokens + index_local_tokens "
                    f"({self.index_init_tokens + self.index_local_tokens})"
                )
        if self.mtp_num_layers < 0:
            raise ConfigError(f"'mtp_num_layers' must be >= 0, got {self.mtp_num_layers}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"'{name}' must be in [0, vocab_size={self.vocab_size}), got {getattr(self, name)}")

    # --- derived -----------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts_total(self) -> int:
        return self.n_routed_experts + self.zero_expert_num

    @property
    def ffn_slots_per_token(self) -> float:
        if self.expected_ffn_experts_per_token > 0:
            return self.expected_ffn_experts_per_token
        return self.moe_topk * self.n_routed_experts / self.num_experts_total

    @property
    def yarn_enabled(self) -> bool:
        return self.yarn_factor > 1.0

    @property
    def ngram_enabled(self) -> bool:
        return self.oe_vocab_size_ratio > 0

    @property
    def ngram_branches(self) -> int:
        return self.oe_split_num * (self.oe_neighbor_num - 1) if self.ngram_enabled else 0

    @property
    def ngram_base_modulus(self) -> int:
        return int(self.oe_vocab_size_ratio * self.vocab_size)

    @property
    def lsa_enabled(self) -> bool:
        return self.index_n_heads > 0

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn_enabled and self.yarn_mscale_all_dim:
            m = yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim)
            scale *= m * m
        return scale

    # --- conversion --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "ModelConfig":
        return from_dict({**self.to_dict(), **overrides})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            import tomli_w

            path.write_text(tomli_w.dumps({"model": self.to_dict()}))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------------------------------------
# presets

_FLASH = dict(
    vocab_size=131072, hidden_size=6144, num_layers=28, num_attention_heads=64,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    ffn_hidden_size=12288, n_routed_experts=512, zero_expert_num=256, moe_topk=12,
    expert_ffn_hidden_size=2048, routed_scaling_factor=6.0, rope_theta=1e7,
    max_position_embeddings=131072, mtp_num_layers=1, expected_ffn_experts_per_token=7.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # A unit-test toy that still has every feature on: n-grams, sparse attention, MTP, YaRN.
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        ffn_hidden_size=128, n_routed_experts=8, zero_expert_num=4, moe_topk=3,
        expert_ffn_hidden_size=32, routed_scaling_factor=2.0, rope_theta=1e4,
        max_position_embeddings=1024, yarn_factor=4.0, yarn_original_max_position_embeddings=256,
        oe_vocab_size_ratio=2.0, oe_neighbor_num=3, oe_split_num=2,
        index_n_heads=2, index_head_dim=16, index_topk=24, index_init_tokens=4, index_local_tokens=8,
        mtp_num_layers=1,
    ),
    # What `make demo` trains on two CPU cores: ~21M parameters, ~9M active. The MoE keeps
    # LongCat's shape in miniature: many fine-grained experts, half as many identity experts,
    # 12 slots per token, scaling 6.
    "small": dict(
        vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        ffn_hidden_size=512, n_routed_experts=128, zero_expert_num=64, moe_topk=12,
        expert_ffn_hidden_size=32, routed_scaling_factor=6.0, rope_theta=1e4,
        max_position_embeddings=4096, mtp_num_layers=1,
    ),
    "flash": dict(_FLASH),
    "flash-lite": dict(
        _FLASH, hidden_size=3072, num_layers=14, num_attention_heads=32, ffn_hidden_size=6144,
        n_routed_experts=256, zero_expert_num=128, expert_ffn_hidden_size=1024,
        oe_vocab_size_ratio=78.0, oe_neighbor_num=4, oe_split_num=4,
        rope_theta=5e6, max_position_embeddings=327680, yarn_factor=10.0,
        yarn_original_max_position_embeddings=32768,
    ),
    "longcat2": dict(
        _FLASH, vocab_size=163840, hidden_size=8192, num_layers=38, num_attention_heads=64,
        n_routed_experts=768, zero_expert_num=128, routed_scaling_factor=9.0,
        oe_vocab_size_ratio=100.567, oe_neighbor_num=5, oe_split_num=4,
        index_n_heads=32, index_head_dim=128, index_topk=2048, index_init_tokens=16,
        index_local_tokens=1024, mtp_num_layers=3, rope_theta=1e6,
        max_position_embeddings=1048576, yarn_factor=120.0, yarn_original_max_position_embeddings=8192,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return from_dict({**PRESETS[name], **overrides})


def from_dict(values: dict[str, Any], *, source: str = "model config") -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) in {source}: {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}"
        )
    return ModelConfig(**values)


def load_config(path: str | Path) -> ModelConfig:
    """Read a TOML file (table [model] or top level), our config.json, or a Hugging Face config.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if path.suffix == ".toml":
        data = data.get("model", data)
        base = data.pop("preset", None)
        if base is not None:
            return preset(base, **data)
        return from_dict(data, source=str(path))
    if is_hf_config(data):
        return from_hf_config(data)
    return from_dict(data, source=str(path))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["hidden_size=512", "yarn_factor=4"]` -> typed dict; names and types are checked later."""
    hints = typing.get_type_hints(ModelConfig)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like FIELD=VALUE")
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in hints:
            raise ConfigError(f"unknown model config field '{name}' in override '{item}'")
        kind = hints[name]
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[name] = raw.lower() in ("true", "1")
            elif kind is int:
                out[name] = int(float(raw)) if float(raw).is_integer() else int(raw)
            else:
                out[name] = kind(raw)
        except ValueError:
            raise ConfigError(f"override '{item}': '{name}' must be {kind.__name__}") from None
    return out


# ---------------------------------------------------------------------------------------------------
# Hugging Face config.json (model_type longcat_flash, plus the LongCat-2.0 keys)

_HF_ALIASES = {
    "ngram_vocab_size_ratio": "oe_vocab_size_ratio",
    "emb_neighbor_num": "oe_neighbor_num",
    "emb_split_num": "oe_split_num",
    "index_head_dim": "index_head_dim",
    "index_n_heads": "index_n_heads",
    "index_topk": "index_topk",
    "expert_ffn_hidden_size": "expert_ffn_hidden_size",
    "moe_intermediate_size": "expert_ffn_hidden_size",
    "num_experts_per_tok": "moe_topk",
    "intermediate_size": "ffn_hidden_size",
}
# HF keys that carry no architectural information for us.
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "attention_bias", "attention_dropout", "hidden_act", "tie_word_embeddings", "num_key_value_heads",
    "head_dim", "qk_head_dim", "num_hidden_layers", "output_router_logits", "auto_map", "ep_size",
    "router_bias", "quantization_config", "use_over_embedding", "zero_expert_type", "moe_impl",
    "moe_switch_token_num", "rope_scaling", "rope_parameters", "rope_theta", "pretraining_tp",
    "_name_or_path", "mla_scale_q_lora", "mla_scale_kv_lora", "norm_topk_prob", "chat_template",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
    "problem_type", "tokenizer_class", "is_encoder_decoder", "oe_ignore_first_embed_scaling",
    "generation_config", "num_experts_per_tok", "num_local_experts", "chunk_size_feed_forward",
    "torchscript", "use_bfloat16", "tie_encoder_decoder", "add_cross_attention", "is_decoder",
    "cross_attention_hidden_size", "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "tf_legacy_loss", "pruned_heads", "output_scores", "return_dict_in_generate",
    # published LongCat configs: read by the checkpoint loader (oe_embed_dim, index_k_norm_type) or
    # without architectural content for us
    "oe_embed_dim", "index_k_norm_type", "attention_method", "num_nextn_predict_layers", "torch_dtype",
    "dequantized_from",  # written by `longcat convert --to bf16|fp32` from an FP8 checkpoint
}


def is_hf_config(data: dict[str, Any]) -> bool:
    return "model_type" in data or "architectures" in data


def from_hf_config(data: dict[str, Any]) -> ModelConfig:
    values: dict[str, Any] = {}
    known = {f.name for f in fields(ModelConfig)}
    unused = sorted(k for k in data if _HF_ALIASES.get(k, k) not in known and k not in _HF_IGNORED)
    if unused:
        warnings.warn(f"config.json keys not used by longcat: {', '.join(unused)}", stacklevel=2)
    for key, value in data.items():
        name = _HF_ALIASES.get(key, key)
        if name in known:
            if value is None:
                continue
            if name in ("bos_token_id", "eos_token_id", "pad_token_id") and isinstance(value, list):
                value = value[0]
            values.setdefault(name, value)
    if "num_layers" not in values and "num_hidden_layers" in data:
        values["num_layers"] = data["num_hidden_layers"] // 2 if data.get("model_type") == "longcat_flash" else data["num_hidden_layers"]
    if "index_topk" in data and "index_local_tokens" not in values:
        values.setdefault("index_local_tokens", min(1024, data["index_topk"] // 2))
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    theta = data.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        values["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("yarn", "deepseek_yarn"):
        values["yarn_factor"] = float(rope["factor"])
        values["yarn_original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        for ours, theirs in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                             ("yarn_mscale", "mscale"), ("yarn_mscale_all_dim", "mscale_all_dim")):
            if rope.get(theirs) is not None:
                values[ours] = float(rope[theirs])
    elif rope_type not in ("default", None):
        raise ConfigError(f"rope type '{rope_type}' in config.json is not supported (use default or yarn)")
    if data.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings=true is not part of the LongCat architecture (untied head)")
    if data.get("num_key_value_heads") not in (None, data.get("num_attention_heads")):
        raise ConfigError("num_key_value_heads must equal num_attention_heads for MLA")
    for key in ("mla_scale_q_lora", "mla_scale_kv_lora"):
        if data.get(key) is False:
            raise ConfigError(f"{key}=false is not supported: longcat's MLA always applies the LoRA variance scale")
    if data.get("index_k_norm_type") not in (None, "rmsnorm", "RMSNorm", "rms"):
        raise ConfigError(f"index_k_norm_type {data['index_k_norm_type']!r} is not supported: the LSA indexer's "
                          "key norm is an RMSNorm")
    if data.get("zero_expert_type") not in (None, "identity"):
        raise ConfigError(f"zero_expert_type {data['zero_expert_type']!r} is not supported (identity only)")
    return from_dict(values, source="Hugging Face config.json")


def to_hf_config(config: ModelConfig, architecture: str = "LongcatFlashForCausalLM") -> dict[str, Any]:
    """A config.json in the published family `architecture`: LongcatFlashForCausalLM (with
    model_type longcat_flash, which transformers' LongcatFlashConfig needs and the published file
    lacks), LongcatFlashNgramForCausalLM (n-gram keys ngram_vocab_size_ratio, emb_neighbor_num,
    emb_split_num) or LongcatCausalLM (model_type null; oe_* n-gram keys, LSA index_* keys)."""
    c = config
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "longcat_flash" if architecture == "LongcatFlashForCausalLM" else None,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_attention_heads,
        "q_lora_rank": c.q_lora_rank,
        "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim,
        "qk_rope_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim,
        # transformers sizes its rotary embedding by `head_dim`: it must be the rope dim.
        "head_dim": c.qk_rope_head_dim,
        "ffn_hidden_size": c.ffn_hidden_size,
        "expert_ffn_hidden_size": c.expert_ffn_hidden_size,
        "n_routed_experts": c.n_routed_experts,
        "zero_expert_num": c.zero_expert_num,
        "moe_topk": c.moe_topk,
        "routed_scaling_factor": c.routed_scaling_factor,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "mla_norm_eps": c.mla_norm_eps,
        "expected_ffn_experts_per_token": c.expected_ffn_experts_per_token,
        "mtp_num_layers": c.mtp_num_layers,
    }
    if c.yarn_enabled:
        out["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": c.yarn_factor,
            "original_max_position_embeddings": c.yarn_original_max_position_embeddings,
            "beta_fast": c.yarn_beta_fast,
            "beta_slow": c.yarn_beta_slow,
            "mscale": c.yarn_mscale,
            "mscale_all_dim": c.yarn_mscale_all_dim,
        }
    if c.ngram_enabled and architecture == "LongcatFlashNgramForCausalLM":
        out.update(
            ngram_vocab_size_ratio=c.oe_vocab_size_ratio,
            emb_neighbor_num=c.oe_neighbor_num,
            emb_split_num=c.oe_split_num,
            oe_scale_word_embedding=c.oe_scale_word_embedding,
        )
    elif c.ngram_enabled:
        out.update(
            use_over_embedding=True,
            oe_vocab_size_ratio=c.oe_vocab_size_ratio,
            oe_neighbor_num=c.oe_neighbor_num,
            oe_split_num=c.oe_split_num,
            oe_embed_dim=c.hidden_size // c.ngram_branches,
            oe_scale_word_embedding=c.oe_scale_word_embedding,
        )
    if c.lsa_enabled:
        out.update(
            index_n_heads=c.index_n_heads,
            index_head_dim=c.index_head_dim,
            index_topk=c.index_topk,
            index_init_tokens=c.index_init_tokens,
            index_local_tokens=c.index_local_tokens,
        )
    return out


def describe_fields() -> str:
    """One line per field, for --help texts."""
    return "\n".join(f"  {f.name} ({typing.get_type_hints(ModelConfig)[f.name].__name__})" for f in fields(ModelConfig))


__all__ = [
    "ConfigError", "ModelConfig", "PRESETS", "preset", "from_dict", "load_config", "parse_overrides",
    "from_hf_config", "to_hf_config", "is_hf_config", "yarn_mscale", "field",
]
