"""`longcat.load`: the one model loader every entry point uses.

Accepts a Hugging Face / published LongCat directory (LongCat-Flash-Chat, -Flash-Lite, LongCat-2.0,
BF16 or FP8), our model directory, a training run directory (its newest complete checkpoint,
single- or multi-process), or one checkpoint step_N directory.
"""

from __future__ import annotations

import os
import sys

import torch

from ..model import LongCatForCausalLM
from .materialize import WEIGHTS_DTYPES
from .runs import DCP_CHECKPOINT, HF_MODEL, resolve
from .safetensors_io import CheckpointError

# Loads at least this large show a progress bar (in bytes) on a terminal.
PROGRESS_MIN_BYTES = 1 << 30


def load(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
         weights_dtype: str | None = None, progress: bool | None = None) -> LongCatForCausalLM:
    """The model at `path` (see the module docstring), built on the meta device and filled tensor
    by tensor from memory-mapped safetensors.

    `dtype` casts floating-point weights (None keeps the stored dtype; FP8-stored weights are
    dequantized to the dtype of the word embedding; router weights stay fp32). `weights_dtype`:
    "bf16" or "fp32" dequantize and cast everything to that dtype; "fp8" keeps the expert and
    projection weights as e4m3 with 128x128 block scales (quantizing them if the checkpoint is not
    FP8) and computes with them. `progress`: a byte progress bar (None: for loads of 1 GiB or more
    on a terminal). Raises CheckpointError with the problem and the fix for anything else, before
    the model is allocated.
    """
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise CheckpointError(f"weights_dtype {weights_dtype!r} is not one of {', '.join(WEIGHTS_DTYPES)}")
    found = resolve(path)
    if found.kind == HF_MODEL:
        from .hf import open_published

        opened = open_published(found.weights)
        total = sum(p.nbytes for p in opened.plans.values())
        from .materialize import materialize

        try:
            with _progress_bar(total, progress, f"loading {opened.label}") as advance:
                return materialize(opened.config, dict(opened.plans), device=device, dtype=dtype,
                                   weights_dtype=weights_dtype, origin=str(found.weights), progress=advance)
        finally:
            opened.source.close()
    if found.kind == DCP_CHECKPOINT:
        from .dcp import load_dcp

        return load_dcp(found.weights, device=device, dtype=dtype, weights_dtype=weights_dtype)
    from .native import load_model

    return load_model(found.weights, device=device, dtype=dtype, weights_dtype=weights_dtype)


def load_model_config(path: str | os.PathLike):
    """The ModelConfig of anything `load` accepts, read from its headers and config files only
    (for published checkpoints, with what the keys say, e.g. the number of MTP layers)."""
    found = resolve(path)
    if found.kind == HF_MODEL:
        from .hf import open_published

        opened = open_published(found.weights)
        opened.source.close()
        return opened.config
    from ..config import load_config

    return load_config(found.weights)


class _progress_bar:
    """A rich progress bar in bytes on stderr, or nothing (small loads, no terminal)."""

    def __init__(self, total: int, show: bool | None, what: str) -> None:
        if show is None:
            show = total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
        self.show, self.total, self.what = show, total, what

    def __enter__(self):
        if not self.show:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self.bar = Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.what, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
        return False


__all__ = ["load", "load_model_config", "PROGRESS_MIN_BYTES"]
