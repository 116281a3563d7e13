"""Pure PyTorch model code: no I/O, no torch.distributed imports."""

from .attention import MLA, AttentionContext, Indexer, select_tokens
from .cache import LatentCache
from .count import ParamCount, count_parameters, kv_cache_bytes_per_token
from .layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope
from .lm import CausalLMOutput, DecoderLayer, LongCatForCausalLM, MTPLayer, RouterStats, build_model, lm_losses, training_losses
from .moe import GroupedExperts, LocalDispatcher, MoE, Router, Routing
from .ngram import NgramEmbedding, ngram_rows

__all__ = [
    "MLA", "AttentionContext", "Indexer", "select_tokens", "LatentCache", "ParamCount",
    "count_parameters", "kv_cache_bytes_per_token", "RMSNorm", "RotaryEmbedding", "SwiGLU",
    "apply_rope", "CausalLMOutput", "DecoderLayer", "LongCatForCausalLM", "MTPLayer", "RouterStats",
    "build_model", "lm_losses", "training_losses", "GroupedExperts", "LocalDispatcher", "MoE", "Router", "Routing",
    "NgramEmbedding", "ngram_rows",
]
