"""Small building blocks: RMSNorm, SwiGLU, rotary embedding with YaRN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale


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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
