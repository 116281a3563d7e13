"""Block-scaled FP8 (e4m3) weights, as the published LongCat FP8 checkpoints store them.

One fp32 scale per 128x128 block of a 2-D weight (leading dimensions, e.g. stacked experts, are
batch dimensions). The grid is ceil-sized, so the last block of a dimension that is not a multiple
of 128 is partial; nothing is padded in the stored tensors. The scale is stored as
`weight_scale_inv` and multiplied in: `w ~= q.float() * scale_inv` blockwise, with
`scale_inv = amax(|block|) / 448` (448 is e4m3's largest finite value).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128


def scale_grid(shape: tuple[int, ...] | torch.Size, block: int = BLOCK) -> tuple[int, ...]:
    """The shape of `weight_scale_inv` for a weight of `shape`: ceil-divided last two dimensions."""
    if len(shape) < 2:
        raise ValueError(f"block-scaled FP8 needs a weight of at least 2 dimensions, got shape {tuple(shape)}")
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block), math.ceil(cols / block))


def expand_scales(scale_inv: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """Per-block scales (..., R, C) -> per-element (..., rows, cols), cropping the partial last block."""
    full = scale_inv.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return full[..., :rows, :cols]


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (..., rows, cols) -> (e4m3 weight of the same shape, fp32 scale_inv (..., R, C))."""
    *lead, rows, cols = weight.shape
    grid_r, grid_c = math.ceil(rows / block), math.ceil(cols / block)
    w = weight.detach().float()
    padded = torch.nn.functional.pad(w, (0, grid_c * block - cols, 0, grid_r * block - rows))
    blocks = padded.reshape(*lead, grid_r, block, grid_c, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., R, C)
    scale_inv = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    scale_inv = torch.where(amax > 0, scale_inv, torch.ones_like(scale_inv))  # all-zero block: any scale
    q = (w / expand_scales(scale_inv, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv.float()


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = BLOCK) -> torch.Tensor:
    """(e4m3 weight (..., rows, cols), fp32 scale_inv (..., R, C)) -> weight in `dtype`."""
    *_, rows, cols = q.shape
    expected = scale_grid(q.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"(expected {expected} for {block}x{block} blocks)")
    return (q.float() * expand_scales(scale_inv.float(), rows, cols, block)).to(dtype)


__all__ = ["BLOCK", "FP8_DTYPE", "FP8_MAX", "dequantize_blockwise", "expand_scales", "quantize_blockwise",
           "scale_grid"]
