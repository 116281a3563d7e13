"""Build a model on the meta device and give it its weights: the last step of every loader.

Loading never allocates a random model first: the modules are created on `meta`, the weights are
checked against the config (names and shapes, every mismatch named) before anything is allocated,
then each tensor is allocated in its final dtype and filled, one at a time. A weight is either a
tensor already in memory (our model directory, DCP) or a `Planned` one: parts of safetensors files
(one expert of a stacked tensor, one n-gram branch of a fused projection), read from a memory map
as it is filled, dequantized or quantized on the way. So a load holds the model it builds plus one
tensor, never a second copy of the state dict.

`weights_dtype="fp8"` makes the expert and projection weights FP8-resident (model/fp8.py): they
are filled as e4m3 plus block scales, copied as stored when the checkpoint is FP8 on the same
grid, quantized (amax/448 per block) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..model import LongCatForCausalLM
from ..model.fp8 import (BLOCK, dequantize_blockwise, fp8_parameter_names, fp8_stacked_parts, is_fp8,
                         quantize_stacked, scale_name, to_fp8_)
from ..model.layers import RotaryEmbedding
from .safetensors_io import CheckpointError, SafetensorsDir

WEIGHTS_DTYPES = {"fp8": None, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Part:
    """One stored tensor and where it lands in one of our tensors."""

    key: str
    index: tuple = ()  # the slice of our tensor it fills (() = all of it)
    scale_key: str | None = None  # its weight_scale_inv when stored FP8
    scale_index: tuple = ()  # the slice of our FP8-resident scale tensor its block grid fills


@dataclass
class Planned:
    """A weight still on disk: `parts` of `source`, which together cover it exactly."""

    source: SafetensorsDir
    parts: list[Part] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(self.source.info[p.key].nbytes for p in self.parts)

    def stored_dtype(self) -> torch.dtype:
        return self.source.info[self.parts[0].key].dtype

    def fill(self, out: torch.Tensor, dequantized: torch.dtype) -> None:
        """Copy every part into `out` (any float dtype), dequantizing FP8 parts."""
        for p in self.parts:
            with self.source.view(p.key) as t:
                if p.scale_key is not None:
                    t = dequantize_blockwise(t, self.source.get(p.scale_key), dtype=dequantized)
                out[p.index].copy_(t)

    def fill_fp8(self, q: torch.Tensor, scale: torch.Tensor, stacked: int = 1) -> None:
        """Fill an FP8-resident weight: FP8 parts as stored, others quantized part by part
        (`stacked`: weights stacked along the rows of one part, each on its own block grid)."""
        for p in self.parts:
            with self.source.view(p.key) as t:
                if p.scale_key is not None:
                    q[p.index].copy_(t)
                    scale[p.scale_index].copy_(self.source.get(p.scale_key))
                else:
                    tq, ts = quantize_stacked(t, stacked if t.dim() == q.dim() else 1)
                    q[p.index].copy_(tq)
                    scale[p.scale_index].copy_(ts)

    def fill_box(self, out: torch.Tensor, shape: tuple[int, ...], offset: tuple[int, ...],
                 dequantized: torch.dtype) -> None:
        """Fill `out`, the box at `offset` of our tensor of global `shape`, reading only the bytes
        of each part that fall in the box (FP8 parts: their whole 128x128 blocks, dequantized)."""
        for p in self.parts:
            overlap = _overlap(p.index, shape, offset, tuple(out.shape))
            if overlap is None:
                continue
            src_offset, src_size, dest = overlap
            if p.scale_key is None:
                out[dest].copy_(self.source.get_box(p.key, src_offset, src_size))
                continue
            # an FP8 part: read the blocks the box touches, dequantize them, cut the box out
            stored = self.source.info[p.key].shape
            lo, hi = list(src_offset), [o + n for o, n in zip(src_offset, src_size)]
            for d in (-2, -1):
                lo[d] = lo[d] // BLOCK * BLOCK
                hi[d] = min(stored[d], -(-hi[d] // BLOCK) * BLOCK)
            blocks = self.source.get_box(p.key, tuple(lo), tuple(h - a for a, h in zip(lo, hi)))
            scale = self.source.get_box(p.scale_key, *_block_box(lo, hi, self.source.info[p.scale_key].shape))
            dense = dequantize_blockwise(blocks, scale, dtype=dequantized)
            cut = tuple(slice(o - a, o - a + n) for o, a, n in zip(src_offset, lo, src_size))
            out[dest].copy_(dense[cut])

    def fill_fp8_box(self, q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], offset: tuple[int, ...],
                     scale_offset: tuple[int, ...], stacked: int = 1) -> None:
        """`fill_fp8` for the box at `offset` of an FP8-resident weight of global `shape` whose block
        scales are the box at `scale_offset` of the global grid. The box must lie on the 128x128
        grid and, for a stacked weight, keep its rows whole (the caller checks both first)."""
        for p in self.parts:
            overlap = _overlap(p.index, shape, offset, tuple(q.shape))
            if overlap is None:
                continue
            src_offset, src_size, dest = overlap
            t = self.source.get_box(p.key, src_offset, src_size)
            if p.scale_key is not None:
                hi = [o + n for o, n in zip(src_offset, src_size)]
                ts = self.source.get_box(p.scale_key, *_block_box(src_offset, hi, self.source.info[p.scale_key].shape))
            else:
                t, ts = quantize_stacked(t, stacked if t.dim() == q.dim() else 1)
            q[dest].copy_(t)
            # the part's scales land in its scale_index region of our grid, moved by the blocks the box skips
            skipped = iter(_block_offset(src_offset))
            target, kept = [], 0
            for d, o in enumerate(scale_offset):
                start, dropped = _start(p.scale_index, d)
                if dropped:
                    target.append(start - o)
                else:
                    first = start + next(skipped) - o
                    target.append(slice(first, first + ts.shape[kept]))
                    kept += 1
            scale[tuple(target)].copy_(ts)


def _start(index: tuple, d: int) -> tuple[int, bool]:
    """(first position, whether the dimension is dropped) of dimension `d` of an index into our tensor."""
    if d >= len(index):
        return 0, False
    i = index[d]
    if isinstance(i, int):
        return i, True
    return i.start or 0, False


def _overlap(index: tuple, shape: tuple[int, ...], offset: tuple[int, ...], size: tuple[int, ...]):
    """Where a part that fills `index` of our tensor of `shape` meets the box [offset, offset + size):
    (offset and size of the overlap in the stored tensor's coordinates, the index of the overlap in
    the box), or None when they do not meet."""
    src_offset, src_size, dest = [], [], []
    for d, (extent, o, n) in enumerate(zip(shape, offset, size)):
        i = index[d] if d < len(index) else slice(None)
        start, stop = (i, i + 1) if isinstance(i, int) else i.indices(extent)[:2]
        lo, hi = max(start, o), min(stop, o + n)
        if lo >= hi:
            return None
        if isinstance(i, int):
            dest.append(lo - o)
        else:
            src_offset.append(lo - start)
            src_size.append(hi - lo)
            dest.append(slice(lo - o, hi - o))
    return tuple(src_offset), tuple(src_size), tuple(dest)


def _block_offset(offset) -> list[int]:
    """An element offset in block units on the last two dimensions (leading dimensions unchanged)."""
    return [*offset[:-2], *(o // BLOCK for o in offset[-2:])]


def _block_box(lo, hi, grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, size) in a block-scale grid of the blocks that the element box [lo, hi) touches."""
    first = _block_offset(lo)
    last = [*hi[:-2], *(min(g, -(-h // BLOCK)) for h, g in zip(hi[-2:], grid[-2:]))]
    return tuple(first), tuple(b - a for a, b in zip(first, last))


def _check_names(expected: dict[str, torch.Tensor], state: dict, origin: str) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:5])})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:5])})")
        raise CheckpointError(f"{origin} does not match its config: " + "; ".join(parts))
    for name, t in expected.items():
        value = state[name]
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{origin}: tensor '{name}' has shape {tuple(value.shape)}, the config implies {tuple(t.shape)}"
            )


def materialize(config: ModelConfig, state: dict[str, torch.Tensor | Planned], *, device="cpu",
                dtype: torch.dtype | None = None, weights_dtype: str | None = None, origin: str = "checkpoint",
                progress: Callable[[int], None] | None = None) -> LongCatForCausalLM:
    """A LongCatForCausalLM holding `state` (our parameter names) on `device`.

    `dtype` casts floating-point weights (None keeps the stored dtype; FP8-stored weights are
    dequantized to the dtype of the word embedding). `weights_dtype` "bf16"/"fp32" is the same as
    that dtype; "fp8" keeps the expert and projection weights in e4m3 with block scales. `origin`
    names the source in error messages; `progress(bytes)` is called as planned weights are read.
    Takes ownership of `state`: its entries are replaced as they are filled.
    """
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise CheckpointError(f"weights_dtype {weights_dtype!r} is not one of {', '.join(WEIGHTS_DTYPES)}")
    if dtype is None and weights_dtype is not None:
        dtype = WEIGHTS_DTYPES[weights_dtype]
    with torch.device("meta"):
        model = LongCatForCausalLM(config)
    fp8_names = set()
    if weights_dtype == "fp8":
        fp8_names = fp8_parameter_names(model)
        to_fp8_(model)
    full = model.state_dict()
    expected = {k: v for k, v in full.items()
                if not (k.endswith("_scale_inv") and k[: -len("_scale_inv")] in fp8_names)}
    _check_names(expected, state, origin)
    dequantized = dtype or _embedding_dtype(state)
    for name, target in expected.items():
        value = state[name]
        if name in fp8_names:
            q = torch.empty(target.shape, dtype=target.dtype, device=device)
            scale_key = scale_name(name)
            scale = torch.empty(full[scale_key].shape, dtype=torch.float32, device=device)
            if isinstance(value, Planned):
                value.fill_fp8(q, scale, fp8_stacked_parts(name))
            elif is_fp8(value):
                raise CheckpointError(f"{origin}: '{name}' is FP8 without its block scales")
            else:
                vq, vs = quantize_stacked(value, fp8_stacked_parts(name))
                q.copy_(vq)
                scale.copy_(vs)
            state[name], state[scale_key] = q, scale
        elif isinstance(value, Planned):
            stored = value.stored_dtype()
            out_dtype = dtype if (dtype is not None and stored.is_floating_point) else stored
            if is_fp8(stored) or any(p.scale_key for p in value.parts):
                out_dtype = dequantized
            out = torch.empty(target.shape, dtype=out_dtype, device=device)
            value.fill(out, dequantized)
            state[name] = out
        else:
            # one tensor at a time, so a cast or a move never holds two copies of the whole model
            cast = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
            state[name] = value.to(device=device, dtype=cast)
        if progress is not None and isinstance(value, Planned):
            progress(value.nbytes)
    model.load_state_dict(state, assign=True)
    # The rotary tables are not in the state dict (non-persistent buffers): build them for real.
    model.rotary = RotaryEmbedding(config, config.qk_rope_head_dim).to(device)
    # Router bias and classifier stay fp32 whatever the weight dtype (routing decisions are fragile).
    for layer in model.layers:
        layer.mlp.router.float()
    return model


def _embedding_dtype(state: dict) -> torch.dtype:
    """The dtype FP8-stored weights dequantize to by default: that of the word embedding."""
    value = state.get("embed_tokens.weight")
    if isinstance(value, Planned):
        stored = value.stored_dtype()
    elif isinstance(value, torch.Tensor):
        stored = value.dtype
    else:
        return torch.bfloat16
    return stored if stored.is_floating_point and not is_fp8(stored) else torch.bfloat16


__all__ = ["materialize", "Part", "Planned", "WEIGHTS_DTYPES"]
