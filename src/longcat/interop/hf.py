"""Hugging Face LongcatFlash checkpoints: read and write, in both directions.

Name mapping (ours -> HF) is a prefix `model.` for everything but `lm_head`, except:
- experts: ours stacked `mlp.experts.gate_up_proj` (N, 2F, H) / `down_proj` (N, H, F); on disk one
  key per expert `mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`.
- n-gram: ours `ngram.tables.{b}` and one fused `ngram.proj` (H, B*w); on disk
  `model.oe_embed_tokens{b}` / `model.oe_embed_proj{b}` (also read: `model.ngram_embeddings.
  embedders.{b}` / `.post_projs.{b}` and `model.ngram_embeddings.word_embeddings`).
- MTP: ours `mtp.{d}.*`, on disk `model.mtp.layers.{d}.*`.

The N+Z-rows trap (DESIGN §2.9): transformers 5.0-5.24 sized its fused gate_up_proj with N+Z rows,
so what those versions save carries gate/up keys for the Z identity experts (and no down_proj for
them), and they expect them when loading; 5.25 and later use N rows, as Meituan published. We
ignore such rows when reading, and write them only when asked (`identity_expert_rows=True`,
`longcat convert --identity-expert-rows`, or `reference.transformers_wants_identity_rows()`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import ModelConfig, from_hf_config, load_config, to_hf_config
from ..model import LongCatForCausalLM
from .materialize import materialize
from .safetensors_io import CheckpointError, SafetensorsDir, write_sharded

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_NGRAM_TABLE = [re.compile(r"^model\.oe_embed_tokens(\d+)\.weight$"),
                re.compile(r"^model\.ngram_embeddings\.embedders\.(\d+)\.weight$")]
_NGRAM_PROJ = [re.compile(r"^model\.oe_embed_proj(\d+)\.weight$"),
               re.compile(r"^model\.ngram_embeddings\.post_projs\.(\d+)\.weight$")]


# ------------------------------------------------------------------------------------------------
# ours -> HF


def hf_tensors(model: LongCatForCausalLM, *, identity_expert_rows: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every weight of `model`."""
    c = model.config
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = "model." + name[: -len("gate_up_proj")]
            F = c.expert_ffn_hidden_size
            for j in range(c.n_routed_experts):
                yield f"{prefix}{j}.gate_proj.weight", t[j, :F]
                yield f"{prefix}{j}.up_proj.weight", t[j, F:]
            if identity_expert_rows:
                zero = t.new_zeros(F, c.hidden_size)
                for j in range(c.n_routed_experts, c.num_experts_total):
                    yield f"{prefix}{j}.gate_proj.weight", zero
                    yield f"{prefix}{j}.up_proj.weight", zero
        elif name.endswith("mlp.experts.down_proj"):
            prefix = "model." + name[: -len("down_proj")]
            for j in range(c.n_routed_experts):
                yield f"{prefix}{j}.down_proj.weight", t[j]
        elif name.startswith("ngram.tables."):
            b = int(name.split(".")[2])
            yield f"model.oe_embed_tokens{b}.weight", t
        elif name == "ngram.proj.weight":
            width = t.shape[1] // c.ngram_branches
            for b in range(c.ngram_branches):
                yield f"model.oe_embed_proj{b}.weight", t[:, b * width : (b + 1) * width]
        elif name.startswith("mtp."):
            yield "model.mtp.layers." + name[len("mtp.") :], t
        elif name == "lm_head.weight":
            yield name, t
        else:
            yield "model." + name, t


def save_hf(
    model: LongCatForCausalLM,
    path: str | os.PathLike,
    *,
    identity_expert_rows: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_json: str | None = None,
) -> Path:
    """Write config.json + safetensors in the HF LongcatFlash layout (one key per expert).

    By default only the N real experts are written (Meituan's published layout, which transformers
    >= 5.25 reads); `identity_expert_rows=True` adds the zero gate/up rows of the Z identity experts
    that transformers 5.0-5.24 requires.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = ((k, v.detach().cpu().contiguous()) for k, v in hf_tensors(model, identity_expert_rows=identity_expert_rows))
    write_sharded(tensors, path, max_shard_bytes=max_shard_bytes)
    cfg = to_hf_config(model.config)
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


# ------------------------------------------------------------------------------------------------
# HF -> ours


def _match_any(patterns: list[re.Pattern], key: str) -> int | None:
    for p in patterns:
        m = p.match(key)
        if m:
            return int(m.group(1))
    return None


def state_dict_from_hf(config: ModelConfig, source: SafetensorsDir) -> dict[str, torch.Tensor]:
    """Convert HF tensors to our state-dict names, stacking per-expert keys."""
    c = config
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    tables: dict[int, torch.Tensor] = {}
    projs: dict[int, torch.Tensor] = {}
    unexpected = []
    for key in source.keys():
        m = _EXPERT_KEY.match(key)
        if m:
            layer, j, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            if j >= c.n_routed_experts:
                continue  # identity-expert rows written by transformers: unused (the N+Z trap)
            experts.setdefault((layer, kind), {})[j] = source.get(key)
            continue
        b = _match_any(_NGRAM_TABLE, key)
        if b is not None:
            tables[b] = source.get(key)
            continue
        b = _match_any(_NGRAM_PROJ, key)
        if b is not None:
            projs[b] = source.get(key)
            continue
        if key == "model.ngram_embeddings.word_embeddings.weight":
            out["embed_tokens.weight"] = source.get(key)
        elif key.startswith("model.mtp.layers."):
            out["mtp." + key[len("model.mtp.layers.") :]] = source.get(key)
        elif key == "lm_head.weight":
            out[key] = source.get(key)
        elif key.startswith("model."):
            out[key[len("model.") :]] = source.get(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in {source.path}: {', '.join(unexpected[:8])}")
    for (layer, kind), by_j in experts.items():
        missing = sorted(set(range(c.n_routed_experts)) - set(by_j))
        if missing:
            raise CheckpointError(f"layer {layer} is missing {kind} of experts {missing[:8]} in {source.path}")
        stacked = torch.stack([by_j[j] for j in range(c.n_routed_experts)])
        experts[(layer, kind)] = stacked
    for layer in range(c.num_layers):
        gate, up, down = (experts.get((layer, k)) for k in ("gate_proj", "up_proj", "down_proj"))
        if gate is None or up is None or down is None:
            raise CheckpointError(f"layer {layer} has no expert weights in {source.path}")
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"layers.{layer}.mlp.experts.down_proj"] = down
    if c.ngram_enabled:
        if sorted(tables) != list(range(c.ngram_branches)) or sorted(projs) != list(range(c.ngram_branches)):
            raise CheckpointError(
                f"the config asks for {c.ngram_branches} n-gram branches but {source.path} holds "
                f"{len(tables)} tables and {len(projs)} projections"
            )
        for b, t in tables.items():
            out[f"ngram.tables.{b}.weight"] = t
        out["ngram.proj.weight"] = torch.cat([projs[b] for b in range(c.ngram_branches)], dim=1)
    return out


def load_hf(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> LongCatForCausalLM:
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    config = from_hf_config(raw)
    source = SafetensorsDir(path)
    if config.mtp_num_layers and not any(k.startswith("model.mtp.") for k in source.keys()):
        warnings.warn(f"{path} has no MTP weights; loading without MTP heads (mtp_num_layers=0)", stacklevel=2)
        config = config.replace(mtp_num_layers=0)
    state = state_dict_from_hf(config, source)
    return materialize(config, state, device=device, dtype=dtype, origin=str(path))


__all__ = ["save_hf", "load_hf", "hf_tensors", "state_dict_from_hf", "CheckpointError", "load_config"]
