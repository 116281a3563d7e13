"""`longcat.load`: the one model loader every entry point uses.

Accepts a Hugging Face LongcatFlash directory, our model directory, a training run directory
(its newest complete checkpoint, single- or multi-process), or one checkpoint step_N directory.
"""

from __future__ import annotations

import os

import torch

from ..model import LongCatForCausalLM
from .runs import DCP_CHECKPOINT, HF_MODEL, resolve


def load(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> LongCatForCausalLM:
    """The model at `path` (see the module docstring), built on the meta device and assigned.

    `dtype` casts floating-point weights (None keeps the stored dtype; router weights stay fp32).
    Raises CheckpointError with the problem and the fix for anything else.
    """
    found = resolve(path)
    if found.kind == HF_MODEL:
        from .hf import load_hf

        return load_hf(found.weights, device=device, dtype=dtype)
    if found.kind == DCP_CHECKPOINT:
        from .dcp import load_dcp

        return load_dcp(found.weights, device=device, dtype=dtype)
    from .native import load_model

    return load_model(found.weights, device=device, dtype=dtype)


__all__ = ["load"]
