"""Fixed-length training windows from a token stream: packing, shuffling, rank sharding, resume.

Packing. The token stream holds every document followed by eos, so windows cross document
boundaries and the model (its n-gram embedding included) sees where documents end. Window i is
tokens[i*T : i*T + T + 1] (T = seq_len): T+1 tokens, inputs the first T, labels the last T (the
next token of each input). Windows start at multiples of T, so consecutive windows share one token
(the last label of one is the first input of the next) and every token is predicted exactly once
per epoch. A stream of N tokens gives (N - 1) // T windows; the last partial one is dropped.

Order. Think of one endless list of windows: epoch 0's permutation, then epoch 1's, ... where
epoch e is a permutation of all windows drawn from a generator seeded with (seed, e). Global step
s takes the next world_size * batch_size entries of that list; rank r takes the r-th block of
batch_size of them. So:
- the ranks of one step get disjoint windows (when world_size * batch_size <= windows), and their
  union, in rank order, is exactly the batch a single process with batch_size * world_size gets;
- an epoch ends mid-batch without dropping windows: the batch is completed from the next epoch;
- the state is one number (windows consumed so far, over all ranks), so resume gives the identical
  next batches, and even a resume with another world size or batch size continues the same list.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .errors import DataError

STATE_VERSION = 1


class PackedBatches:
    """Shuffled (seq_len+1)-token windows of a token stream, sharded by data-parallel rank."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size}")
        if tokens.ndim != 1:
            raise DataError(f"tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.windows: int = (len(tokens) - 1) // seq_len if len(tokens) else 0
        if self.windows == 0:
            raise DataError(f"the training data has {len(tokens)} tokens, too few for one window of seq_len+1 = "
                            f"{seq_len + 1}; use a shorter --seq-len or more data")
        self.cursor = 0  # windows consumed by all ranks together
        self._orders: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch of the next window this process reads."""
        return (self.cursor + self.rank * self.batch_size) // self.windows

    @property
    def step(self) -> int:
        """Global batches taken so far (at the current world size and batch size)."""
        return self.cursor // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.windows)
            else:
                order = np.arange(self.windows)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # keep memory flat
            self._orders[epoch] = order
        return order

    def window_indices(self) -> np.ndarray:
        """The windows of this rank's next batch, without taking it: (batch_size,) int64."""
        start = self.cursor + self.rank * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        epochs = positions // self.windows
        return np.array([self._order(int(e))[p % self.windows] for p, e in zip(positions, epochs)],
                        dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (batch_size, seq_len) int64; labels are inputs shifted by one."""
        rows = _gather(self.tokens, self.window_indices(), self.seq_len)  # (B, T+1)
        self.cursor += self.batch_size * self.world_size
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "cursor": int(self.cursor),
            "seed": int(self.seed),
            "shuffle": bool(self.shuffle),
            "windows": int(self.windows),
            "seq_len": int(self.seq_len),
            "batch_size": int(self.batch_size),
            "world_size": int(self.world_size),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved sampler stopped. The data and seq_len must be the same; a
        different batch size or world size continues the same window order from the same place."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["seq_len"] != self.seq_len or state["windows"] != self.windows:
            raise DataError(
                f"the saved data position is for {state['windows']} windows of {state['seq_len'] + 1} tokens, "
                f"but this run has {self.windows} windows of {self.seq_len + 1}: the data, tokenizer or "
                "seq_len changed since the checkpoint; use the same ones to resume")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.cursor = int(state["cursor"])
        self._orders = {}


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out windows in stream order (same packing as PackedBatches): at most max_batches
    batches of (inputs, labels); the last batch may have fewer rows. A stream shorter than one
    window gives one shorter window of len(tokens) - 1 tokens instead."""
    if len(tokens) < 2:
        raise DataError(f"the held-out data has {len(tokens)} tokens; evaluation needs at least 2")
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    seq_len = min(seq_len, len(tokens) - 1)
    windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    for start in range(0, windows, batch_size):
        rows = _gather(tokens, np.arange(start, min(start + batch_size, windows)), seq_len)
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> torch.Tensor:
    """(len(windows), seq_len + 1) int64 rows tokens[w*T : w*T + T + 1]."""
    rows = np.empty((len(windows), seq_len + 1), dtype=np.int64)
    for row, window in enumerate(windows):
        start = int(window) * seq_len
        rows[row] = tokens[start:start + seq_len + 1]
    return torch.from_numpy(rows)
