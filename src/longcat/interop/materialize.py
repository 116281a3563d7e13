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
from ..model.fp8 import (dequantize_blockwise, fp8_parameter_names, fp8_stacked_parts, is_fp8, quantize_blockwise,
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

    def fill_fp8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Fill an FP8-resident weight: FP8 parts as stored, others quantized part by part."""
        for p in self.parts:
            with self.source.view(p.key) as t:
                if p.scale_key is not None:
                    q[p.index].copy_(t)
                    scale[p.scale_index].copy_(self.source.get(p.scale_key))
                else:
                    tq, ts = quantize_blockwise(t)
                    q[p.index].copy_(tq)
                    scale[p.scale_index].copy_(ts)


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
                value.fill_fp8(q, scale)
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
