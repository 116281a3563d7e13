"""Sharded construction: fill only this rank's shard of a model built on the meta device.

`parallelize` applies the layout (pipeline split, TP, EP, CP, FSDP) to a model whose parameters
are still on the meta device, the way TorchTitan does: every plan works on meta tensors, so no
rank ever holds the whole model. `materialize_shards` then allocates each parameter's local
shard on the device (`to_empty`) and fills it with the values the same parameter has in a
one-process model (`longcat.model.lm.init_parameter_`: a function of the parameter's full name,
the seed and the global index, not of the layout). A DTensor's local shard is the box of the
global tensor that torch's own placement arithmetic assigns to this rank (the same boxes the
distributed checkpoint writes), so FSDP (even and uneven), expert, tensor and HSDP shards and
their combinations all land on the one-process values.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..config import ModelConfig
from ..model.lm import init_buffers_, init_parameter_


def is_meta_model(model: nn.Module) -> bool:
    """True when every parameter is on the meta device; ValueError for a half-built model."""
    flags = {p.is_meta for p in model.parameters()}
    if flags == {True, False}:
        meta = [n for n, p in model.named_parameters() if p.is_meta][:3]
        raise ValueError(f"the model is partly on the meta device ({', '.join(meta)}, ...): build it whole "
                         "on the meta device (build_model(config, device='meta')) or whole on a real device")
    return flags == {True}


def mark_shard(p: torch.Tensor, global_shape: tuple[int, ...], offset: tuple[int, ...]) -> torch.Tensor:
    """Record that plain tensor `p` is the box at `offset` of a global tensor of `global_shape`
    (layouts that shard without DTensor, e.g. inference tensor parallelism), for `shard_box`."""
    if len(global_shape) != p.dim() or len(offset) != p.dim():
        raise ValueError(f"shard of rank {p.dim()} marked with global shape {global_shape} and offset {offset}")
    p._longcat_shard = (tuple(global_shape), tuple(offset))
    return p


def shard_box(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]:
    """(global shape, offset of the local box, local tensor) of a parameter: a DTensor, a plain
    tensor marked by `mark_shard`, or a plain unsharded tensor."""
    marked = getattr(p, "_longcat_shard", None)
    if marked is not None:
        return marked[0], marked[1], p
    if isinstance(p, DTensor):
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"local shard {tuple(local.shape)} is not the box {tuple(shape)} its placements "
                               f"{p.placements} give")
        return tuple(p.shape), tuple(offset), local
    return tuple(p.shape), (0,) * p.dim(), p


@torch.no_grad()
def materialize_shards(parts: list[nn.Module], device: torch.device, seed: int, config: ModelConfig) -> int:
    """Allocate and initialise this rank's shard of every parameter and buffer of `parts` (modules
    whose parameter names are the full model's). Returns the bytes allocated for parameters."""
    allocated = 0
    seen: set[int] = set()
    for part in parts:
        part.to_empty(device=device)
    for part in parts:
        for name, p in part.named_parameters():
            if id(p) in seen:  # a parameter two parts hold is filled once
                continue
            seen.add(id(p))
            shape, offset, local = shard_box(p)
            init_parameter_(local, name, seed, config.initializer_range, global_shape=shape, offset=offset)
            allocated += local.numel() * local.element_size()
        init_buffers_(part, config)
    return allocated


__all__ = ["materialize_shards", "is_meta_model", "mark_shard", "shard_box"]
