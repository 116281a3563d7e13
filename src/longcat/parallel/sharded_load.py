"""Sharded loading: fill only this rank's box of every parameter from a checkpoint on disk.

    from longcat.parallel.sharded_load import load_config, load_shards, prepare_meta_model

    config = load_config(PATH)                            # any checkpoint longcat reads
    model = build_model(config, device="meta")            # nothing allocated
    prepare_meta_model(model, dtype=torch.bfloat16)       # optional, on meta: dtype / FP8-resident
    ... apply the layout (DTensor plans, or plain local tensors marked with `mark_shard`) ...
    nbytes = load_shards([model], PATH, device=device, dtype=torch.bfloat16)

`load_shards(parts, path, *, device, dtype=None, weights_dtype=None, progress=None) -> int` takes
modules whose parameter names are the full model's (the model, or its pipeline stages), still on
the meta device or already `to_empty`'d, and fills every parameter and buffer with this rank's box
of the checkpoint's tensor (`sharded_init.shard_box`: a DTensor's local shard, a plain tensor
marked with `mark_shard(p, global_shape, offset)`, or a whole plain tensor). It returns the bytes
this rank read from disk. No collective is run, so ranks may load at their own pace.

Every checkpoint `longcat.load` reads works, with the same values `longcat.load(PATH, dtype=...,
weights_dtype=...)` gives in one process, bit for bit:

- published / Hugging Face LongCat directories (BF16 and FP8) and our model directories: each box
  is read with positioned reads of only the bytes it spans (an expert-parallel rank reads its
  experts, a tensor-parallel rank its rows or heads), FP8 weights dequantized block by block;
- single-process training runs (their newest checkpoint's model directory);
- multi-process (DCP) training checkpoints: torch.distributed.checkpoint reads the saved chunks
  that overlap the box (its own resharding), whatever layout wrote them.

Dtypes are the parts' own: build them with `prepare_meta_model` before the layout (a DTensor's or
FSDP's dtype cannot change afterwards). `dtype` names the dtype the float weights are expected in
(router weights stay fp32, holding the `dtype`-rounded values as `longcat.load` does);
`weights_dtype="fp8"` expects FP8-resident expert and projection weights (e4m3 plus a
`<name>_scale_inv` buffer, `model.fp8.to_fp8_` on meta): FP8 checkpoints are copied as stored,
others quantized per 128x128 block. An FP8 weight's box must hold whole blocks (a ConfigError
naming the degree to change otherwise, before anything is allocated) and its scale buffer must be
the box of the block grid that matches (mark it with `mark_shard` when the weight is marked).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import ConfigError, ModelConfig
from ..interop.materialize import WEIGHTS_DTYPES, Part, Planned
from ..interop.runs import DCP_CHECKPOINT, HF_MODEL, resolve
from ..interop.safetensors_io import CheckpointError, SafetensorsDir
from ..model import LongCatForCausalLM
from ..model.fp8 import BLOCK, fp8_stacked_parts, is_fp8, quantize_stacked, scale_grid, scale_name, to_fp8_
from ..model.layers import RotaryEmbedding
from .sharded_init import mark_shard, shard_box

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global shape, offset)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of any checkpoint `load_shards` reads, from its config files and headers only."""
    found = resolve(path)
    if found.kind == DCP_CHECKPOINT:
        from ..interop.dcp import dcp_model_config

        return dcp_model_config(found.weights)
    from ..interop.loader import load_model_config

    return load_model_config(path)


@torch.no_grad()
def prepare_meta_model(model: nn.Module, *, dtype: torch.dtype | None = None,
                       weights_dtype: str | None = None) -> nn.Module:
    """Give a meta-device model the dtypes a load will fill, before the layout is applied: float
    weights in `dtype` (router weights and RoPE tables stay fp32, as `longcat.load` keeps them), and with
    `weights_dtype="fp8"` FP8-resident expert and projection weights (e4m3 + block-scale buffers)."""
    _check_weights_dtype(weights_dtype)
    dtype = dtype if dtype is not None else WEIGHTS_DTYPES.get(weights_dtype or "")
    if dtype is not None:
        model.to(dtype)
        for name, module in model.named_modules():
            if name.endswith("mlp.router") or isinstance(module, RotaryEmbedding):
                module.float()
    if weights_dtype == "fp8":
        to_fp8_(model)
    return model


# ------------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """One parameter or persistent buffer of the parts, and the box of it this rank holds."""

    name: str
    shape: tuple[int, ...]  # global
    offset: tuple[int, ...]
    size: tuple[int, ...]
    marked: bool  # a plain tensor marked with mark_shard (the mark is put back after to_empty)
    scale: _Target | None = None  # the block scales of an FP8-resident weight
    stacked: int = 1


def _check_weights_dtype(weights_dtype: str | None) -> None:
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise CheckpointError(f"weights_dtype {weights_dtype!r} is not one of {', '.join(WEIGHTS_DTYPES)}")


def _target(name: str, t: torch.Tensor) -> _Target:
    shape, offset, local = shard_box(t)
    return _Target(name, tuple(shape), tuple(offset), tuple(local.shape), getattr(t, "_longcat_shard", None) is not None)


def _persistent_state(part: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers under their full names, as the tensor objects themselves
    (`state_dict` would hand out DTensor locals or detached copies and drop the marks)."""
    found = dict(part.named_parameters())
    for module_name, module in part.named_modules():
        for buffer_name, b in module.named_buffers(recurse=False):
            if b is not None and buffer_name not in module._non_persistent_buffers_set:
                found[f"{module_name}.{buffer_name}" if module_name else buffer_name] = b
    return found


def _plan_targets(parts: list[nn.Module], dtype: torch.dtype | None, weights_dtype: str | None) -> dict[str, _Target]:
    """Every tensor to fill with its box, FP8 weights paired with their scales; every check that
    needs no checkpoint data (dtypes, FP8 block alignment) happens here, before allocation."""
    tensors: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, t in _persistent_state(part).items():
            tensors.setdefault(name, t)
    targets = {name: _target(name, t) for name, t in tensors.items()}
    fp8 = [n for n, t in tensors.items() if is_fp8(t)]
    for name in fp8:
        scale = targets.pop(scale_name(name), None)
        if scale is None:
            raise ConfigError(f"'{name}' is float8_e4m3fn without a '{scale_name(name)}' buffer; make weights "
                              "FP8-resident with prepare_meta_model(model, weights_dtype='fp8') before the layout")
        target = targets[name]
        target.scale, target.stacked = scale, fp8_stacked_parts(name)
        expected = fp8_scale_box(name, target.shape, target.offset, target.size, target.stacked)
        if (scale.offset, scale.size) != expected or scale.shape != _global_grid(target):
            raise ConfigError(f"the scale buffer of '{name}' holds the box at {scale.offset} of size {scale.size} of "
                              f"grid {scale.shape}, but the weight's box needs the blocks at {expected[0]} of size "
                              f"{expected[1]} of grid {_global_grid(target)}; mark it with mark_shard(scale, grid, "
                              "offset) the way the weight is marked")
    if weights_dtype == "fp8" and not fp8:
        raise ConfigError("weights_dtype='fp8' but the parts hold no FP8-resident weight: call "
                          "prepare_meta_model(model, weights_dtype='fp8') on the meta model before the layout")
    if dtype is not None:
        for name, t in tensors.items():
            if t.is_floating_point() and not is_fp8(t) and t.dtype != dtype and not _keeps_fp32(name, t):
                raise ConfigError(f"'{name}' is {t.dtype} but dtype {dtype} was asked: call "
                                  f"prepare_meta_model(model, dtype={dtype}) on the meta model before the layout")
    return targets


def _keeps_fp32(name: str, t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and (".mlp.router." in name or name.endswith("_scale_inv"))


def _global_grid(target: _Target) -> tuple[int, ...]:
    *lead, rows, cols = target.shape
    grid = scale_grid((*lead, rows // target.stacked, cols))
    return (*grid[:-2], grid[-2] * target.stacked, grid[-1])


def fp8_scale_box(name: str, shape: tuple[int, ...], offset: tuple[int, ...], size: tuple[int, ...],
                  stacked: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, size) in the block-scale grid of the box at `offset` of size `size` of FP8 weight
    `name` of global `shape`. ConfigError when the box cuts a 128x128 block (or, for weights stacked
    along their rows, cuts the rows at all), naming the degree to change."""
    rows, cols = shape[-2:]
    if stacked > 1 and (offset[-2], size[-2]) != (0, rows):
        raise ConfigError(f"the layout splits the rows of '{name}' ({stacked} weights stacked, each on its own FP8 "
                          "block grid); split the experts with ep instead, or load with weights_dtype='bf16'")
    for d, what in ((-2, "rows"), (-1, "columns")):
        extent, lo, n = shape[d], offset[d], size[d]
        if lo % BLOCK or ((lo + n) % BLOCK and lo + n != extent):
            pieces = extent // n if n and extent % n == 0 else None
            good = [1] + [k for k in range(2, extent // BLOCK + 1) if extent % k == 0 and (extent // k) % BLOCK == 0]
            split = f"{pieces} ways" if pieces else "unevenly"
            raise ConfigError(
                f"the layout splits the {extent} {what} of FP8 weight '{name}' {split} (this rank holds {n} from "
                f"{lo}), which cuts its {BLOCK}x{BLOCK} scale blocks; change the degree that splits it (tensor "
                f"parallelism) to one of {good}, or load with weights_dtype='bf16'")
    if stacked > 1:  # rows whole: every stacked weight's grid, one after the other
        first_row, rows_blocks = 0, scale_grid((rows // stacked, cols))[0] * stacked
    else:
        first_row = offset[-2] // BLOCK
        rows_blocks = -(-(offset[-2] + size[-2]) // BLOCK) - first_row
    first_col = offset[-1] // BLOCK
    cols_blocks = -(-(offset[-1] + size[-1]) // BLOCK) - first_col
    return (*offset[:-2], first_row, first_col), (*size[:-2], rows_blocks, cols_blocks)


# ------------------------------------------------------------------------------------------------


def _open(found):
    """(source, plans by our name, the checkpoint's global shape by our name, the checkpoint's config)."""
    if found.kind == HF_MODEL:
        from ..interop.hf import open_published

        opened = open_published(found.weights)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in LongCatForCausalLM(opened.config).state_dict().items()}
        return opened.source, dict(opened.plans), shapes, opened.config
    from ..interop.loader import load_model_config

    config = load_model_config(found.weights)
    source = SafetensorsDir(found.weights)
    plans = {key: Planned(source, [Part(key)]) for key in source.keys()}
    return source, plans, {k: i.shape for k, i in source.info.items()}, config


def _check_against(targets: dict[str, _Target], shapes: dict[str, tuple[int, ...]], origin: str) -> None:
    missing = sorted(n for n in targets if n not in shapes)
    if missing:
        raise CheckpointError(f"{origin} has no tensor for {len(missing)} of the model's weights (e.g. "
                              f"{', '.join(missing[:3])}); build the model from the checkpoint's own config "
                              "(sharded_load.load_config)")
    for name, t in targets.items():
        if tuple(shapes[name]) != t.shape:
            raise CheckpointError(f"{origin}: tensor '{name}' has shape {tuple(shapes[name])}, the model being "
                                  f"loaded has {t.shape}; build it from the checkpoint's own config")


def _allocate(parts: list[nn.Module], targets: dict[str, _Target], device) -> dict[str, torch.Tensor]:
    """`to_empty` the parts still on meta and put the marks back; the local tensor of every target."""
    device = torch.device(device)
    for part in parts:
        if any(t.is_meta for t in [*part.parameters(), *part.buffers()]):
            part.to_empty(device=device)
    every = {**targets, **{t.scale.name: t.scale for t in targets.values() if t.scale is not None}}
    locals_: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, t in _persistent_state(part).items():
            target = every.get(name)
            if target is None or name in locals_:
                continue
            if target.marked:
                mark_shard(t, target.shape, target.offset)
            local = t.to_local() if isinstance(t, DTensor) else t
            if tuple(local.shape) != target.size:
                raise RuntimeError(f"'{name}' holds {tuple(local.shape)} after allocation, its box is {target.size}")
            locals_[name] = local.data if isinstance(local, nn.Parameter) else local
    return locals_


def _fill_rotary(parts: list[nn.Module], config: ModelConfig) -> None:
    for part in parts:
        for module in part.modules():
            if isinstance(module, RotaryEmbedding):
                module.inv_freq.copy_(RotaryEmbedding(config, 2 * module.inv_freq.shape[0]).inv_freq)


@torch.no_grad()
def load_shards(parts: list[nn.Module], path: str | os.PathLike, *, device, dtype: torch.dtype | None = None,
                weights_dtype: str | None = None, progress: Callable[[int], None] | None = None) -> int:
    """Fill every parameter and persistent buffer of `parts` with this rank's box of the checkpoint
    at `path` (see the module docstring); returns the bytes this rank read from disk.

    `progress(bytes)` is called after each tensor with the bytes read for it. Raises CheckpointError
    (checkpoint and model disagree) or ConfigError (dtypes, FP8 blocks) before allocating anything.
    """
    _check_weights_dtype(weights_dtype)
    if weights_dtype in ("bf16", "fp32") and dtype is None:
        dtype = WEIGHTS_DTYPES[weights_dtype]
    targets = _plan_targets(parts, dtype, weights_dtype)
    found = resolve(path)
    config = next((p.config for p in parts if isinstance(getattr(p, "config", None), ModelConfig)), None)
    if found.kind == DCP_CHECKPOINT:
        return _load_dcp(parts, found.weights, targets, device, dtype, progress, config)
    source, plans, shapes, ckpt_config = _open(found)
    try:
        _check_against(targets, shapes, str(found.weights))
        locals_ = _allocate(parts, targets, device)
        _fill_rotary(parts, config or ckpt_config)
        dequantized = dtype or _embedding_dtype(plans)
        for name, target in targets.items():
            before = source.bytes_read
            plan, local = plans[name], locals_[name]
            if target.scale is not None:
                plan.fill_fp8_box(local, locals_[target.scale.name], target.shape, target.offset, target.scale.offset,
                                  target.stacked)
            elif dtype is not None and local.is_floating_point() and local.dtype != dtype:
                # as `longcat.load`: the value is cast to `dtype` first (a router then keeps it in fp32)
                staged = torch.empty(local.shape, dtype=dtype, device=local.device)
                plan.fill_box(staged, target.shape, target.offset, dequantized)
                local.copy_(staged)
            else:
                plan.fill_box(local, target.shape, target.offset, dequantized)
            if progress is not None:
                progress(source.bytes_read - before)
        return source.bytes_read
    finally:
        source.close()


def _embedding_dtype(plans: dict[str, Planned]) -> torch.dtype:
    """The dtype FP8-stored weights dequantize to when no dtype is asked: the word embedding's, as
    `longcat.load` does."""
    plan = plans.get("embed_tokens.weight")
    stored = plan.stored_dtype() if plan is not None else torch.bfloat16
    return stored if stored.is_floating_point and not is_fp8(stored) else torch.bfloat16


# ------------------------------------------------------------------------------------------------
# DCP


def _load_dcp(parts, step_dir, targets: dict[str, _Target], device, dtype, progress, config) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    from ..interop.dcp import MODEL_PREFIX, dcp_model_config

    class CachedReader(dcp.FileSystemReader):
        """Reads .metadata once, however many `dcp.load` calls follow (one per FP8 weight)."""

        cached = None

        def read_metadata(self, *args, **kwargs):
            if self.cached is None:
                self.cached = super().read_metadata(*args, **kwargs)
            return self.cached

    ckpt_config = dcp_model_config(step_dir)
    reader = CachedReader(str(step_dir))
    try:
        metadata = reader.read_metadata()
    except (OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read the DCP metadata of {step_dir}: {exc}") from exc
    shapes = {k[len(MODEL_PREFIX):]: tuple(m.size) for k, m in metadata.state_dict_metadata.items()
              if k.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    stored_dtypes = {k[len(MODEL_PREFIX):]: m.properties.dtype for k, m in metadata.state_dict_metadata.items()
                     if k.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    if any(n.startswith("mtp.") for n in targets) and not any(n.startswith("mtp.") for n in shapes):
        raise CheckpointError(f"{step_dir} has no MTP weights (a pipeline-parallel run trains none); build the "
                              "model with mtp_num_layers=0")
    _check_against(targets, shapes, str(step_dir))
    locals_ = _allocate(parts, targets, device)
    _fill_rotary(parts, config or ckpt_config)
    read = 0

    class BoxPlanner(DefaultLoadPlanner):
        """Reads the box of each tensor that `boxes` holds (a DTensor's shard or a marked plain one)."""

        def __init__(self, boxes: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.boxes = boxes

        def create_local_plan(self) -> LoadPlan:
            nonlocal read
            items = []
            for fqn, (offset, tensor) in self.boxes.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=tensor.shape)
                items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            read += sum(reader.storage_data[i.storage_index].length for i in items)
            return LoadPlan(items)

        def lookup_tensor(self, index) -> torch.Tensor:
            return self.boxes[index.fqn][1]

    def load(boxes: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
            dcp.load({k: t for k, (_, t) in boxes.items()}, storage_reader=reader, planner=BoxPlanner(boxes),
                     no_dist=True)

    dense, staged = {}, {}
    for name, target in targets.items():
        local = locals_[name]
        if target.scale is not None:
            continue
        if dtype is not None and local.is_floating_point() and local.dtype != dtype:
            staged[name] = torch.empty(local.shape, dtype=dtype, device=local.device)
            dense[MODEL_PREFIX + name] = (target.offset, staged[name])
        else:
            dense[MODEL_PREFIX + name] = (target.offset, local)
    before = read
    load(dense)
    for name, buffer in staged.items():
        locals_[name].copy_(buffer)  # as `longcat.load`: cast to `dtype` first, then kept in fp32
    if progress is not None:
        progress(read - before)
    for name, target in targets.items():
        if target.scale is None:
            continue
        # quantize the box of one FP8-resident weight at a time: only one dense box is ever held
        before = read
        box = torch.empty(target.size, dtype=stored_dtypes[name], device=locals_[name].device)
        load({MODEL_PREFIX + name: (target.offset, box)})
        q, s = quantize_stacked(box, target.stacked)
        locals_[name].copy_(q)
        locals_[target.scale.name].copy_(s)
        if progress is not None:
            progress(read - before)
    return read


__all__ = ["load_shards", "load_config", "prepare_meta_model", "fp8_scale_box"]
