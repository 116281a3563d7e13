"""What every benchmark shares: the comparable model, its prompts, and a clock that waits for the device.

Accelerators run asynchronously: a kernel launch returns before the work is done, so a clock read
right after it times the launch, not the work. `Timer` synchronizes the device it times before
every read, whatever the accelerator (CUDA, ROCm, XPU, MPS, NPU, ...); on the CPU an operation has
finished when it returns, so there is nothing to wait for.
"""

from __future__ import annotations

import time

import torch

from ..config import ModelConfig, preset
from ..devices import synchronize

CLOCKS = ("wall", "cpu")


def comparable_config(name: str, **overrides) -> ModelConfig:
    """The preset without the parts transformers' LongcatFlash lacks (n-grams, LSA, MTP)."""
    return preset(name, **{**overrides, "oe_vocab_size_ratio": 0.0, "index_n_heads": 0, "mtp_num_layers": 0})


def random_prompts(lengths, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """One prompt of random token ids per length, reproducible from `seed`. Ids start at 3 so that
    no prompt holds the pad/bos/eos ids, which would end or reshape a generation."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]




class Timer:
    """A clock for timing work on `device`: call it before and after, subtract.

    clock: "wall" (elapsed seconds) or "cpu" (this process's CPU seconds, which other jobs on a
    shared machine do not inflate; meaningful with one thread and on the CPU only, since time spent
    waiting for an accelerator is not CPU time).
    """

    def __init__(self, clock: str = "wall", device: torch.device | str = "cpu") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        self.clock = clock
        self.device = torch.device(device)
        self._read = time.perf_counter if clock == "wall" else time.process_time

    def __call__(self) -> float:
        synchronize(self.device)
        return self._read()


__all__ = ["CLOCKS", "Timer", "comparable_config", "random_prompts", "synchronize"]
