"""Small building blocks: the weight product every module calls, RMSNorm, SwiGLU, rotary embedding
with YaRN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale
from .fp8 import dense_weight, is_fp8


# Rows (input vectors per weight matrix) up to which `linear` is a generated reduction when compiled
# on CPU; above it, the BLAS GEMM, whose register blocking wins once each weight is reused enough.
REDUCTION_ROWS = 8


def realized(x: torch.Tensor) -> torch.Tensor:
    """x's values, computed into a buffer of their own when compiled. Inductor otherwise inlines a
    cheap producer (a norm, an activation) into the reduction that reads it and recomputes it for
    every weight row; an as_strided view needs real storage, so its input is realized first. The
    clone gives as_strided a fresh contiguous base: on a view of another buffer it would address
    that buffer's storage, which a compiled graph may lay out anew."""
    x = x.clone(memory_format=torch.contiguous_format)
    return torch.as_strided(x, x.shape, x.stride())


def linear(x: torch.Tensor, w: torch.Tensor | nn.Linear) -> torch.Tensor:
    """x @ w.T: w (out, in) with x (..., in) -> (..., out); or grouped, w (G, out, in) with
    x (G, N, in) -> (G, N, out) (group g's rows times group g's matrix).

    Given an `nn.Linear`, the module itself is called except on the few-row compiled path below:
    tensor parallelism (DTensor `parallelize_module`) works through the module's forward hooks,
    which reading `.weight` would bypass.

    Eager this is F.linear / bmm. Compiled for a CPU with few rows per weight matrix (decode), it
    is written as a multiply-and-sum, which inductor generates as one vectorised loop that streams
    each weight row once for all rows, fused with the norm or activation producing x. BLAS GEMV on
    the (out, in) layout streams weights well below memory bandwidth, and a decode step is mostly
    weight streaming.

    An FP8-resident module (e4m3 weight + `weight_scale_inv`, model/fp8.py) is dequantized block by
    block into x's dtype here, inside the product, so the model holds one byte per weight.
    """
    module = w if isinstance(w, nn.Module) else None
    if module is not None:
        w = module.weight
        if is_fp8(w):
            w, module = dense_weight(module, dtype=x.dtype), None
    grouped = w.dim() == 3
    rows = x.shape[-2] if grouped else x.numel() // x.shape[-1]
    few = torch.compiler.is_compiling() and x.device.type == "cpu" and isinstance(rows, int) and rows <= REDUCTION_ROWS
    if not few:
        if module is not None:
            return module(x)
        return torch.bmm(x, w.transpose(1, 2)) if grouped else F.linear(x, w)
    if grouped:
        return (w.unsqueeze(1) * realized(x).unsqueeze(2)).sum(-1)  # (G, N, out)
    flat = realized(x.reshape(rows, x.shape[-1]))  # (rows, in)
    # one single-row reduction per row (vectorised along `in`), rather than one reduction over
    # (out, rows) whose loops inductor orders badly; the row count is a constant of the graph
    y = torch.stack([(w * flat[r]).sum(-1) for r in range(rows)])  # (rows, out)
    return y.reshape(*x.shape[:-1], w.shape[0])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the reference does.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_proj), linear(x, self.up_proj)
        return linear(F.silu(gate) * up, self.down_proj)


def rope_inv_freq(config: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin scale, with YaRN when yarn_factor > 1.

    Matches transformers' `_compute_yarn_parameters` (truncated correction range).
    """
    base = config.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if not config.yarn_enabled:
        return 1.0 / pos, 1.0
    factor = config.yarn_factor
    original = config.yarn_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    if config.yarn_mscale and config.yarn_mscale_all_dim:
        attention_factor = yarn_mscale(factor, config.yarn_mscale) / yarn_mscale(factor, config.yarn_mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the interleaved-pair (DeepSeek) RoPE layout."""

    def __init__(self, config: ModelConfig, dim: int) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) or (T,) -> cos, sin of shape (..., T, dim/2)."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3)...; the result is laid out de-interleaved
    ([rotated evens, rotated odds]) exactly like the reference, so cached keys stay compatible.

    x: (B, T, ..., D); cos/sin: (B or 1, T, D/2) broadcast over the head dims.
    """
    extra = x.dim() - cos.dim()
    for _ in range(extra):
        cos = cos.unsqueeze(-2)
        sin = sin.unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
