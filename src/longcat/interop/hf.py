"""Hugging Face / published LongCat checkpoints: read and write, in both directions.

Four published families share one key vocabulary (docs/CHECKPOINTS.md maps every key):

| architecture (config.json)     | family             | n-gram keys                              |
|--------------------------------|--------------------|------------------------------------------|
| LongcatFlashForCausalLM        | LongCat-Flash-Chat | none                                     |
| LongcatFlashNgramForCausalLM   | LongCat-Flash-Lite | model.ngram_embeddings.{embedders,post_projs}.{b} |
| LongcatCausalLM                | LongCat-2.0        | model.oe_embed_tokens{b} / oe_embed_proj{b} |

each also as FP8 (a `quantization_config`, e4m3 weights with `weight_scale_inv`); the dtype of
every tensor is read from its header, never assumed from the family.

Name mapping (ours -> published) is a prefix `model.` for everything but `lm_head`, except:
- experts: ours stacked `mlp.experts.gate_up_proj` (N, 2F, H) / `down_proj` (N, H, F); on disk one
  key per real expert `mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`.
- n-gram: ours `ngram.tables.{b}` and one fused `ngram.proj` (H, B*w); on disk per branch, flat or
  nested as in the table (`model.ngram_embeddings.word_embeddings` is read as the word embedding).
- MTP: ours `mtp.{d}.*`; on disk `model.mtp.layers.{d}.*` with `enorm.m`/`hnorm.m`, the dense FFN
  under `transformer_layer.mlp`, depth 0's final norm at `model.mtp.norm` (deeper ones at
  `model.mtp.layers.{d}.norm`: open in the public sources), and `model.mtp.embed_tokens`, a copy of
  the word embedding that engines ignore (we write it, and read the main one).

The N+Z-rows trap (DESIGN §2.9): transformers 5.0-5.24 sized its fused gate_up_proj with N+Z rows,
so what those versions save carries gate/up keys for the Z identity experts (and no down_proj for
them), and they expect them when loading; 5.25 and later use N rows, as Meituan published. We
ignore such rows when reading, and write them only when asked (`identity_expert_rows=True`,
`longcat convert --identity-expert-rows`, or `reference.transformers_wants_identity_rows()`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, from_hf_config, load_config, to_hf_config
from ..model import LongCatForCausalLM
from ..model.fp8 import BLOCK, FP8_LINEARS, is_fp8, quantize_blockwise, scale_grid
from .materialize import Part, Planned, materialize
from .safetensors_io import CheckpointError, SafetensorsDir, write_sharded

FLASH, FLASH_LITE, LONGCAT2 = "LongcatFlashForCausalLM", "LongcatFlashNgramForCausalLM", "LongcatCausalLM"


@dataclass(frozen=True)
class Family:
    architecture: str
    name: str  # the published model it is
    ngram_keys: str | None  # "nested", "flat", or None (no n-gram embedding)


FAMILIES = {
    FLASH: Family(FLASH, "LongCat-Flash-Chat", None),
    FLASH_LITE: Family(FLASH_LITE, "LongCat-Flash-Lite", "nested"),
    LONGCAT2: Family(LONGCAT2, "LongCat-2.0", "flat"),
}
SCALE_KEY_SUFFIX = "weight_scale_inv"

_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_NGRAM_TABLE = [re.compile(r"^model\.oe_embed_tokens(\d+)\.weight$"),
                re.compile(r"^model\.ngram_embeddings\.embedders\.(\d+)\.weight$")]
_NGRAM_PROJ = [re.compile(r"^model\.oe_embed_proj(\d+)\.weight$"),
               re.compile(r"^model\.ngram_embeddings\.post_projs\.(\d+)\.weight$")]
_MTP_KEY = re.compile(r"^model\.mtp\.layers\.(\d+)\.(.+)$")


# ------------------------------------------------------------------------------------------------
# families


def recognise(raw: dict, origin: str = "config.json") -> Family:
    """The family a published config.json describes (from `architectures`; `model_type` longcat_flash
    alone means LongCat-Flash); CheckpointError for anything else."""
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch is None and raw.get("model_type") == "longcat_flash":
        arch = FLASH
    if arch not in FAMILIES:
        raise CheckpointError(f"{origin}: architecture {arch!r} (model_type {raw.get('model_type')!r}) is not a "
                              f"LongCat family longcat reads ({', '.join(FAMILIES)}); check that this is a LongCat "
                              "checkpoint, or set \"architectures\" to the family it is")
    return FAMILIES[arch]


def family_for(config: ModelConfig) -> Family:
    """The published family whose layout holds a model of `config` (what the writer uses)."""
    if not config.ngram_enabled:
        return FAMILIES[FLASH]
    if config.lsa_enabled or config.mtp_num_layers > 1:
        return FAMILIES[LONGCAT2]
    return FAMILIES[FLASH_LITE]


def quantization(raw: dict) -> dict | None:
    """The FP8 quantization_config of a published config.json, or None (BF16 checkpoint)."""
    q = raw.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or list(q.get("weight_block_size") or [BLOCK, BLOCK]) != [BLOCK, BLOCK]:
        raise CheckpointError(f"quantization_config {q} is not supported: longcat reads block-scaled FP8 "
                              f"(quant_method fp8, weight_block_size [{BLOCK}, {BLOCK}]) only")
    return q


def family_label(family: Family, raw: dict) -> str:
    return family.name + ("-FP8" if raw.get("quantization_config") else "")


def fp8_key(key: str) -> bool:
    """Whether published weight `key` is one the FP8 checkpoints store in e4m3 (DESIGN §8)."""
    parts = key.split(".")
    return key.endswith(".weight") and len(parts) >= 2 and parts[-2] in FP8_LINEARS


def scale_key(key: str) -> str:
    return key[: -len("weight")] + SCALE_KEY_SUFFIX


# ------------------------------------------------------------------------------------------------
# ours -> published


def _mtp_key(depth: int, rest: str) -> str:
    if rest == "final_layernorm.weight":
        return "model.mtp.norm.weight" if depth == 0 else f"model.mtp.layers.{depth}.norm.weight"
    for ours, theirs in (("enorm.", "enorm.m."), ("hnorm.", "hnorm.m."), ("mlp.", "transformer_layer.mlp.")):
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
            break
    return f"model.mtp.layers.{depth}.{rest}"


def hf_tensors(model: LongCatForCausalLM, *, identity_expert_rows: bool = False,
               family: Family | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (published name, tensor) for every weight of `model`, in the layout of `family`
    (default: the family of its config). Works on a meta model too (names and shapes only)."""
    c = model.config
    family = family or family_for(c)
    flat = family.ngram_keys != "nested"
    for name, t in model.state_dict().items():
        if name.endswith("_scale_inv"):
            continue  # FP8-resident scales: written by the FP8 writer next to their weight
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
            yield (f"model.oe_embed_tokens{b}.weight" if flat else f"model.ngram_embeddings.embedders.{b}.weight"), t
        elif name == "ngram.proj.weight":
            width = t.shape[1] // c.ngram_branches
            for b in range(c.ngram_branches):
                key = f"model.oe_embed_proj{b}.weight" if flat else f"model.ngram_embeddings.post_projs.{b}.weight"
                yield key, t[:, b * width : (b + 1) * width]
        elif name.startswith("mtp."):
            depth, rest = name[len("mtp."):].split(".", 1)
            yield _mtp_key(int(depth), rest), t
        elif name == "lm_head.weight":
            yield name, t
            if c.mtp_num_layers:
                # the published checkpoints carry the MTP's own copy of the word embedding
                yield "model.mtp.embed_tokens.weight", model.embed_tokens.weight
        else:
            yield "model." + name, t


def quantized(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """FP8 the weights the published FP8 checkpoints store in e4m3 (amax/448 per 128x128 block),
    each followed by its weight_scale_inv; everything else passes unchanged."""
    for key, t in tensors:
        if fp8_key(key) and t.dim() == 2 and not is_fp8(t):
            q, s = quantize_blockwise(t)
            yield key, q
            yield scale_key(key), s
        else:
            yield key, t


def fp8_quantization_config(keys: list[str]) -> dict:
    """The quantization_config written with an FP8 checkpoint (DeepSeek-V3 style): the linear
    modules kept in bf16 are listed under `ignored_layers`."""
    kept = sorted({k[: -len(".weight")] for k in keys
                   if k.endswith(".weight") and not fp8_key(k) and "norm" not in k.rsplit(".", 2)[-2]
                   and "embed_tokens" not in k and "embedders" not in k})
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK], "ignored_layers": kept}


def save_hf(
    model: LongCatForCausalLM,
    path: str | os.PathLike,
    *,
    identity_expert_rows: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_json: str | None = None,
    fp8: bool = False,
) -> Path:
    """Write config.json + safetensors in the published layout of the model's family (one key per
    expert); `fp8=True` writes the FP8 checkpoint (e4m3 + weight_scale_inv, quantization_config).

    By default only the N real experts are written (Meituan's published layout, which transformers
    >= 5.25 reads); `identity_expert_rows=True` adds the zero gate/up rows of the Z identity experts
    that transformers 5.0-5.24 requires.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    family = family_for(model.config)
    tensors = ((k, _dense(model, k, v)) for k, v in hf_tensors(model, identity_expert_rows=identity_expert_rows))
    if fp8:
        tensors = quantized(tensors)
    names: list[str] = []

    def recorded():
        for k, v in tensors:
            names.append(k)
            yield k, v

    write_sharded(recorded(), path, max_shard_bytes=max_shard_bytes)
    cfg = to_hf_config(model.config, architecture=family.architecture)
    cfg["torch_dtype"] = str(model.embed_tokens.weight.dtype).replace("torch.", "")
    if fp8:
        cfg["quantization_config"] = fp8_quantization_config(names)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def _dense(model: LongCatForCausalLM, key: str, t: torch.Tensor) -> torch.Tensor:
    """A published tensor in memory, dequantized when the model holds it FP8-resident."""
    t = t.detach()
    if is_fp8(t):
        raise CheckpointError(f"{key}: save an FP8-resident model with longcat convert --to fp8 from its "
                              "checkpoint, or load it with weights_dtype='bf16' first")
    return t.cpu().contiguous()


# ------------------------------------------------------------------------------------------------
# published -> ours


def _match_any(patterns: list[re.Pattern], key: str) -> int | None:
    for p in patterns:
        m = p.match(key)
        if m:
            return int(m.group(1))
    return None


def published_target(key: str, c: ModelConfig):
    """Where published `key` lands: (our name, index, scale index); None for keys read elsewhere or
    ignored (identity-expert rows, the MTP's copy of the embedding); False for an unknown key."""
    m = _EXPERT_KEY.match(key)
    if m:
        layer, j, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        if j >= c.n_routed_experts:
            return None  # identity-expert rows written by transformers 5.0-5.24 (the N+Z trap)
        F = c.expert_ffn_hidden_size
        R = math.ceil(F / BLOCK)
        if kind == "down_proj":
            return f"layers.{layer}.mlp.experts.down_proj", (j,), (j,)
        half = 0 if kind == "gate_proj" else 1
        return (f"layers.{layer}.mlp.experts.gate_up_proj", (j, slice(half * F, (half + 1) * F)),
                (j, slice(half * R, (half + 1) * R)))
    b = _match_any(_NGRAM_TABLE, key)
    if b is not None:
        return f"ngram.tables.{b}.weight", (), ()
    b = _match_any(_NGRAM_PROJ, key)
    if b is not None:
        w = c.hidden_size // max(1, c.ngram_branches)
        return "ngram.proj.weight", (slice(None), slice(b * w, (b + 1) * w)), ()
    if key == "model.ngram_embeddings.word_embeddings.weight":
        return "embed_tokens.weight", (), ()
    if key == "model.mtp.embed_tokens.weight":
        return None  # engines use the main word embedding
    if key == "model.mtp.norm.weight":
        return "mtp.0.final_layernorm.weight", (), ()
    m = _MTP_KEY.match(key)
    if m:
        depth, rest = m.group(1), m.group(2)
        if rest == "norm.weight":
            rest = "final_layernorm.weight"
        for theirs, ours in (("enorm.m.", "enorm."), ("hnorm.m.", "hnorm."), ("transformer_layer.mlp.", "mlp.")):
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs):]
                break
        return f"mtp.{depth}.{rest}", (), ()
    if key == "lm_head.weight":
        return key, (), ()
    if key.startswith("model."):
        return key[len("model."):], (), ()
    return False


def mtp_depths(keys) -> int:
    """MTP layers a published checkpoint holds (from its keys; the configs do not all say)."""
    depths = {int(m.group(1)) for k in keys if (m := _MTP_KEY.match(k))}
    if any(k == "model.mtp.norm.weight" for k in keys):
        depths.add(0)
    return max(depths) + 1 if depths else 0


def config_from_published(raw: dict, keys: list[str], origin: str) -> ModelConfig:
    """Our ModelConfig for a published config.json and the keys beside it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unused keys of published configs (auto_map, ...) are expected
            config = from_hf_config(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None
    depths = mtp_depths(keys)
    if config.mtp_num_layers and not depths:
        warnings.warn(f"{origin} has no MTP weights; loading without MTP heads (mtp_num_layers=0)", stacklevel=3)
    if depths != config.mtp_num_layers:
        config = config.replace(mtp_num_layers=depths)
    embed_dim = raw.get("oe_embed_dim")
    if embed_dim is not None and config.ngram_enabled and embed_dim != config.hidden_size // config.ngram_branches:
        raise CheckpointError(f"{origin}: oe_embed_dim {embed_dim} differs from hidden_size / n-gram branches "
                              f"({config.hidden_size // config.ngram_branches}), the only n-gram width longcat "
                              "implements; check the config")
    return config


def plan_hf(config: ModelConfig, source: SafetensorsDir, family: Family, origin: str) -> dict[str, Planned]:
    """Where each of our weights comes from, checked against the config before anything is read:
    every key known, none missing, every shape and FP8 scale grid right."""
    with torch.device("meta"):
        meta = LongCatForCausalLM(config)
    expected_state = meta.state_dict()
    wanted: dict[tuple[str, str], str] = {}
    for key, _ in hf_tensors(meta, family=family):
        t = published_target(key, config)
        if t:
            wanted[(t[0], repr(t[1]))] = key
    scales = {k for k in source.keys() if k.endswith("." + SCALE_KEY_SUFFIX)}
    used: set[str] = set()
    plans: dict[str, Planned] = {}
    found: set[tuple[str, str]] = set()
    for key in source.keys():
        if key in scales:
            continue
        t = published_target(key, config)
        if t is None:
            continue
        where = source.file_of[key].name
        if t is False or (t[0], repr(t[1])) not in wanted:
            raise CheckpointError(f"unexpected tensor '{key}' in {where}: the {family.name} architecture that "
                                  f"{origin}/config.json describes has no such weight; remove it, or fix "
                                  "config.json if the checkpoint is another model")
        name, index, scale_index = t
        info = source.info[key]
        implied = tuple(expected_state[name][index].shape)
        if info.shape != implied:
            raise CheckpointError(f"'{key}' in {where} has shape {list(info.shape)}, config.json implies "
                                  f"{list(implied)}; the config and the weights come from different models")
        scale = None
        if is_fp8(info.dtype):
            scale = scale_key(key)
            if scale not in source:
                raise CheckpointError(f"'{key}' in {where} is float8_e4m3fn but '{scale}' is missing; the "
                                      "checkpoint is incomplete, download it again")
            grid = scale_grid(info.shape)
            if source.info[scale].shape != grid:
                raise CheckpointError(f"'{scale}' in {source.file_of[scale].name} is {list(source.info[scale].shape)}"
                                      f", but weight {list(info.shape)} needs {list(grid)} (one scale per "
                                      f"{BLOCK}x{BLOCK} block, ceil-sized); the checkpoint is corrupt, download it again")
            used.add(scale)
        found.add((name, repr(index)))
        plans.setdefault(name, Planned(source)).parts.append(Part(key, index, scale, scale_index))
    orphans = sorted(scales - used)
    if orphans:
        raise CheckpointError(f"'{orphans[0]}' in {source.file_of[orphans[0]].name} scales a weight that is not "
                              "stored as FP8 (or is absent); the checkpoint is corrupt, download it again")
    missing = [key for target, key in wanted.items() if target not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{origin} is missing '{missing[0]}'{more}, which the {family.name} architecture in "
                              "config.json needs; download the missing shard, or fix config.json")
    return plans


@dataclass
class Published:
    """A published checkpoint opened: what it is, before anything is allocated."""

    path: Path
    raw: dict
    family: Family
    config: ModelConfig
    source: SafetensorsDir
    plans: dict[str, Planned]

    @property
    def label(self) -> str:
        return family_label(self.family, self.raw)


def open_published(path: str | os.PathLike) -> Published:
    """Read config.json and the safetensors headers and plan the load (every check that needs no
    weight data happens here)."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {exc}") from None
    family = recognise(raw, str(path / "config.json"))
    quantization(raw)
    source = SafetensorsDir(path)
    config = config_from_published(raw, source.keys(), str(path))
    plans = plan_hf(config, source, family, str(path))
    return Published(path, raw, family, config, source, plans)


def load_hf(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
            weights_dtype: str | None = None, progress: Callable[[int], None] | None = None) -> LongCatForCausalLM:
    found = open_published(path)
    try:
        return materialize(found.config, dict(found.plans), device=device, dtype=dtype, weights_dtype=weights_dtype,
                           origin=str(path), progress=progress)
    finally:
        found.source.close()


def state_dict_from_hf(config: ModelConfig, source: SafetensorsDir) -> dict[str, torch.Tensor]:
    """Our state dict of a published checkpoint, in memory (dequantized): for small models and tests;
    loading goes through `load_hf`, which never holds it whole."""
    model = materialize(config, dict(plan_hf(config, source, family_for(config), str(source.path))))
    return model.state_dict()


__all__ = ["save_hf", "load_hf", "hf_tensors", "state_dict_from_hf", "CheckpointError", "load_config", "Family",
           "FAMILIES", "recognise", "family_for", "open_published", "Published", "quantized", "fp8_key",
           "scale_key", "mtp_depths", "fp8_quantization_config", "published_target"]
