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
from torch import nn

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


# ---------------------------------------------------------------------------------------------------
# FP8-resident weights: the model keeps e4m3 weights plus block scales and dequantizes them inside
# the product (`layers.linear`, the experts' grouped GEMM and pair-by-pair path). A module's weight
# is FP8-resident when its `weight` is e4m3 and it holds a `weight_scale_inv` buffer; the stacked
# experts hold `gate_up_scale_inv` / `down_scale_inv`. Inference only: FP8 weights take no gradient
# (training starts from dequantized weights).

# Linear modules whose weights the published FP8 checkpoints store in e4m3 (DESIGN §8); embeddings,
# the output head, norms, the router, the n-gram tables and projections and the indexer's
# per-head weights stay in bf16.
FP8_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj", "eh_proj", "wq_b", "wk")
SCALE_SUFFIX = "_scale_inv"


def is_fp8(t: torch.Tensor | torch.dtype) -> bool:
    """Whether a tensor (or a dtype) is e4m3."""
    return (t if isinstance(t, torch.dtype) else t.dtype) == FP8_DTYPE


def dequantize_stacked(q: torch.Tensor, scale_inv: torch.Tensor, parts: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize `parts` weights stacked along rows, each blocked on its own grid: q (..., parts*r, c)
    with scale_inv (..., parts*R, C) -> (..., parts*r, c). The experts' gate_up_proj stacks gate
    and up, whose grids do not line up with one 2r-row grid when r is not a multiple of 128."""
    if parts == 1:
        return dequantize_blockwise(q, scale_inv, dtype)
    qs, ss = q.chunk(parts, dim=-2), scale_inv.chunk(parts, dim=-2)
    return torch.cat([dequantize_blockwise(a, b, dtype) for a, b in zip(qs, ss)], dim=-2)


def quantize_stacked(weight: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blockwise` for `parts` weights stacked along rows (see `dequantize_stacked`)."""
    if parts == 1:
        return quantize_blockwise(weight)
    pairs = [quantize_blockwise(w) for w in weight.chunk(parts, dim=-2)]
    return torch.cat([p[0] for p in pairs], dim=-2), torch.cat([p[1] for p in pairs], dim=-2)


def dense_weight(module: nn.Module, name: str = "weight", dtype: torch.dtype | None = None, parts: int = 1,
                 index: torch.Tensor | None = None) -> torch.Tensor:
    """module.<name> in `dtype`, dequantized when it is FP8-resident (scale buffer `<name>_scale_inv`).

    `index` selects along the first dimension first (stacked experts: only the chosen ones are
    dequantized); `parts` as in `dequantize_stacked`."""
    w = getattr(module, name)
    if index is not None:
        w = w[index]
    if not is_fp8(w):
        return w if dtype is None else w.to(dtype)
    scale = getattr(module, name + SCALE_SUFFIX)
    if index is not None:
        scale = scale[index]
    return dequantize_stacked(w, scale, parts, dtype or torch.bfloat16)


def scale_name(name: str) -> str:
    """The buffer holding the block scales of parameter `name` (`weight` -> `weight_scale_inv`)."""
    return name + SCALE_SUFFIX


def _fp8_targets(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(module, parameter name, stacked parts) of every weight that can be FP8-resident."""
    found = []
    for qualified, module in model.named_modules():
        leaf = qualified.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in FP8_LINEARS:
            found.append((module, "weight", 1))
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and not isinstance(module.down_proj, nn.Module):
            found.append((module, "gate_up_proj", 2))
            found.append((module, "down_proj", 1))
    return found


def fp8_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters `to_fp8_` makes FP8-resident."""
    ids = {id(getattr(m, n)) for m, n, _ in _fp8_targets(model)}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@torch.no_grad()
def to_fp8_(model: nn.Module) -> nn.Module:
    """Make the expert and projection weights FP8-resident (e4m3 + fp32 block scales), in place.

    On the meta device this only changes dtypes and adds the scale buffers (what a loader fills);
    on real weights it quantizes them (amax/448 per 128x128 block)."""
    for module, name, parts in _fp8_targets(model):
        w = getattr(module, name)
        if is_fp8(w):
            continue
        if w.is_meta:
            q = torch.empty(w.shape, dtype=FP8_DTYPE, device="meta")
            *lead, rows, cols = w.shape
            grid = scale_grid((*lead, rows // parts, cols))
            scale = torch.empty((*grid[:-2], grid[-2] * parts, grid[-1]), device="meta")
        else:
            q, scale = quantize_stacked(w, parts)
        setattr(module, name, nn.Parameter(q, requires_grad=False))
        module.register_buffer(scale_name(name), scale)
    return model


@torch.no_grad()
def from_fp8_(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Undo `to_fp8_`: dequantize every FP8-resident weight to `dtype` (e.g. to fine-tune), in place."""
    for module, name, parts in _fp8_targets(model):
        w = getattr(module, name)
        if not is_fp8(w):
            continue
        setattr(module, name, nn.Parameter(dense_weight(module, name, dtype, parts)))
        delattr(module, scale_name(name))
    return model


def fp8_stacked_parts(name: str) -> int:
    """Stacked weights per row block of parameter `name` (2 for the experts' gate_up_proj)."""
    return 2 if name.endswith("gate_up_proj") else 1


__all__ += ["FP8_LINEARS", "SCALE_SUFFIX", "dense_weight", "dequantize_stacked", "fp8_parameter_names",
            "fp8_stacked_parts", "from_fp8_", "is_fp8", "quantize_stacked", "scale_name", "to_fp8_"]
