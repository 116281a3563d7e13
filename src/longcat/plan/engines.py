"""Serving engines' memory layouts (a TOML catalog in longcat/catalog/engines/).

What a server does with device memory is a fact about the engine, not a tuning knob, and it
differs between engines more than "fp8 = half of bf16" says:

- the KV cache's byte layout per dtype: FlashMLA's FP8 MLA cache keeps the 512-value latent in
  e4m3 with one fp32 scale per 128-value tile and the 64 rope values in bf16 (512 + 16 + 128 = 656
  bytes per token and sublayer); a per-tensor FP8 cache stores all 576 values in e4m3 (576 bytes);
  our own engine caches in the model's dtype;
- the sparse-attention indexer's key cache next to it (e4m3 plus one fp32 scale per 128 values in
  the DeepSeek-V3.2 engines; the latent's dtype in ours);
- the MTP layers' own cache (engines: only as the speculative draft model; ours: always);
- page granularity: every request's cache rounds up to whole pages (64 tokens for FlashMLA), or,
  in our engine, every running request reserves a whole max_len row;
- what the engine's memory fraction covers: SGLang's `--mem-fraction-static` holds weights and KV
  only (activations and CUDA graphs live in the rest), vLLM's `--gpu-memory-utilization` also
  covers the profiled activation peak.

Each engine TOML gives those choices and cites where each comes from in its `[notes]`.
"""

from __future__ import annotations

import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from ..catalog import catalog_file, catalog_names
from ..config import ConfigError
from .arch import Architecture

# bytes per element of the plain (unscaled) cache dtypes
PLAIN_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
KV_DTYPES = ("bf16", "fp16", "fp32", "fp8")
FP8_LAYOUTS = ("per-tensor", "flashmla", "none")
FLASHMLA_TILE = 128  # latent values per fp32 scale in FlashMLA's FP8 cache


@dataclass
class Engine:
    name: str = "engine"
    description: str = ""
    page_tokens: int = 1  # tokens per cache page; 0 = one max_len row per running request
    mem_fraction: float = 0.9  # share of device memory the engine takes
    workspace_in_fraction: bool = True  # whether mem_fraction also covers the activation workspace
    fp8_layout_dense: str = "per-tensor"  # FP8 cache layout for dense-attention MLA/GQA models
    fp8_layout_sparse: str = "flashmla"  # ... for sparse-attention (indexer) MLA models
    indexer_cache: str = "fp8"  # "fp8": e4m3 + fp32 scale per indexer_scale_tile; "kv": the cache dtype
    indexer_scale_tile: int = 128
    mtp_cache: str = "speculative"  # "speculative": only with --mtp; "always": whenever the model has MTP
    prefill_chunk: int = 8192  # tokens per prefill forward
    max_running: int = 256  # requests decoded together
    runtime_reserve_gib: float = 0.0  # CUDA graphs, communication buffers outside the pools
    kv_dtypes: list[str] = field(default_factory=lambda: ["bf16", "fp8"])
    notes: dict[str, str] = field(default_factory=dict, repr=False)

    def validate(self, where: str) -> None:
        if self.page_tokens < 0:
            raise ConfigError(f"{where}: page_tokens must be >= 0 (0 = a max_len row per request)")
        if not 0 < self.mem_fraction <= 1:
            raise ConfigError(f"{where}: mem_fraction must be in (0, 1], got {self.mem_fraction}")
        for name in ("fp8_layout_dense", "fp8_layout_sparse"):
            if getattr(self, name) not in FP8_LAYOUTS:
                raise ConfigError(f"{where}: {name} must be one of {', '.join(FP8_LAYOUTS)}")
        if self.indexer_cache not in ("fp8", "kv"):
            raise ConfigError(f"{where}: indexer_cache must be 'fp8' or 'kv'")
        if self.mtp_cache not in ("speculative", "always"):
            raise ConfigError(f"{where}: mtp_cache must be 'speculative' or 'always'")
        bad = [d for d in self.kv_dtypes if d not in KV_DTYPES]
        if bad:
            raise ConfigError(f"{where}: kv_dtypes {bad} unknown; valid: {', '.join(KV_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "notes"}


def engine_names() -> list[str]:
    return catalog_names("engines")


def load_engine(name: str) -> Engine:
    path = catalog_file("engines", name.lower())
    if path is None:
        raise ConfigError(f"unknown serving engine '{name}'; choose one of: {', '.join(engine_names())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    hints = typing.get_type_hints(Engine)
    known = {f.name for f in fields(Engine)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown engine field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    engine = Engine()
    for key, value in data.items():
        if key == "notes":
            continue
        kind = typing.get_origin(hints[key]) or hints[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{path}: engine field '{key}' must be {kind.__name__}, got {value!r}")
        setattr(engine, key, value)
    engine.notes = {k: str(v) for k, v in data.get("notes", {}).items()}
    engine.validate(str(path))
    return engine


def kv_layout(arch: Architecture, engine: Engine, kv_dtype: str, *, tp: int = 1, mtp: bool = False) -> dict[str, float]:
    """Bytes per token of context on one device, by part, as `engine` lays the cache out.

    Parts: `latent` (MLA latent or GQA K/V values), `rope` (MLA rope keys), `scales` (FP8 scale
    bytes), `indexer` (sparse attention's key cache with its scales), `mtp` (the MTP sublayers'
    entries, when they hold a cache), and `total`."""
    if kv_dtype not in engine.kv_dtypes:
        raise ConfigError(f"--kv-dtype {kv_dtype}: engine '{engine.name}' caches in {', '.join(engine.kv_dtypes)}"
                          + (" (it caches in the model's dtype; use --engine sglang or vllm for an FP8 cache)"
                             if kv_dtype == "fp8" else ""))
    sparse = bool(arch.index_heads or arch.sparse_topk)
    fp8_layout = engine.fp8_layout_sparse if sparse else engine.fp8_layout_dense
    sub = arch.num_layers * arch.attn_per_layer
    out = {"latent": 0.0, "rope": 0.0, "scales": 0.0, "indexer": 0.0, "mtp": 0.0}
    if arch.attention == "mla":
        lat, rope = arch.kv_lora_rank, arch.qk_rope_head_dim
        if kv_dtype != "fp8":
            per = {"latent": lat * PLAIN_BYTES[kv_dtype], "rope": rope * PLAIN_BYTES[kv_dtype], "scales": 0.0}
        elif fp8_layout == "flashmla":
            # e4m3 latent, one fp32 scale per 128-value tile, bf16 rope (FlashMLA's FP8 cache)
            per = {"latent": lat * 1.0, "rope": rope * 2.0, "scales": 4.0 * math.ceil(lat / FLASHMLA_TILE)}
        else:  # one e4m3 tensor with a per-tensor scale
            per = {"latent": lat * 1.0, "rope": rope * 1.0, "scales": 0.0}
    else:
        heads = max(1, arch.kv_heads // tp) if arch.kv_heads >= tp else 1
        per = {"latent": heads * (arch.qk_dim + arch.v_dim) * (1.0 if kv_dtype == "fp8" else PLAIN_BYTES[kv_dtype]),
               "rope": 0.0, "scales": 0.0}
    for k, v in per.items():
        out[k] = sub * v
    if arch.index_heads:
        d = arch.index_head_dim
        if engine.indexer_cache == "fp8":
            key = d + 4.0 * math.ceil(d / max(1, engine.indexer_scale_tile))
        else:
            key = d * (1.0 if kv_dtype == "fp8" else PLAIN_BYTES[kv_dtype])
        out["indexer"] = arch.num_layers * arch.indexers_per_layer * key
    if mtp and arch.mtp_layers:
        out["mtp"] = arch.mtp_layers * sum(per.values())  # one attention sublayer per MTP depth
    out["total"] = sum(out.values())
    return out


def mtp_cached(arch: Architecture, engine: Engine, mtp: bool | None) -> bool:
    """Whether the MTP layers hold a cache: always in engines that build it with the model,
    otherwise only when they draft (speculative decoding, `mtp`)."""
    if not arch.mtp_layers:
        return False
    if mtp is not None:
        return mtp
    return engine.mtp_cache == "always"


def paged_tokens(tokens: int, page: int) -> int:
    """Tokens of cache a request of `tokens` occupies: whole pages."""
    return tokens if page <= 1 else math.ceil(tokens / page) * page


__all__ = ["Engine", "load_engine", "engine_names", "kv_layout", "mtp_cached", "paged_tokens", "KV_DTYPES"]
