"""Preallocated latent KV cache: per attention sublayer, `[c_kv, k_rope]` for every token.

That is kv_lora + rope values per token per sublayer (576 at LongCat sizes) instead of
heads * (nope + rope + v) for an expanded per-head cache. Sublayers are numbered 2*i and 2*i+1 for
decoder layer i, then 2*L + d for MTP depth d. LSA layers also cache their indexer keys.

The storage is one allocation per kind with the sublayer and row dims merged,
(sublayers * allocated rows, max_len, d); `c_kv`, `k_rope`, `index_k` are (sublayers, rows,
max_len, d) views of its first `rows` rows. The indexer keys' allocation is feature-major,
(layers * rows, d, max_len), and every view of it (storage() included) is its transpose, so the
shapes are the same as the other kinds' and only the strides differ. A forward writes its tokens'
keys with one `index_put_` into that allocation (in place under torch.compile too: the
static-cache pattern), then reads positions 0..span-1. A compiled decode step gets the
allocations as inputs and rebuilds the cache around them with `LatentCache.over`, its span the
size of a tensor (dynamic, so one graph serves every length).
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        with_mtp: bool = True,
    ) -> None:
        n = 2 * config.num_layers + (config.mtp_num_layers if with_mtp else 0)
        alloc = (n * batch_size, max_len)
        c = torch.zeros(*alloc, config.kv_lora_rank, dtype=dtype, device=device)
        r = torch.zeros(*alloc, config.qk_rope_head_dim, dtype=dtype, device=device)
        i = None
        if config.lsa_enabled:
            # Stored feature-major, (layers * rows, index_dim, max_len), and seen through its
            # (layers * rows, max_len, index_dim) transpose like the other kinds: a decode step's
            # indexer product reads every cached key, and with each feature contiguous along the
            # positions it is a plain GEMM streaming the keys, not one over a transposed operand.
            i = torch.zeros(config.num_layers * batch_size, config.index_head_dim, max_len, dtype=dtype,
                            device=device).transpose(1, 2)
        self._setup(config, n, (c, r, i), batch_size, max_len)
        # Tokens cached per sequence; maintained by the caller (the inference engine).
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    def _setup(self, config: ModelConfig, num_sublayers: int, storage: tuple, rows, span) -> None:
        self.config, self.num_sublayers = config, num_sublayers
        self._c, self._r, self._i = storage
        self.max_len = self._c.shape[1]
        # rows of the allocation, which narrowed views share
        self.allocated_rows = self._c.shape[0] // num_sublayers
        self.rows = rows
        self._span = span
        # scratch buffers of the LSA indexer's decode steps, by name (see workspace())
        self._workspace: dict[str, torch.Tensor] = {}

    @classmethod
    def over(cls, config: ModelConfig, storage: tuple, rows: int, span, num_sublayers: int) -> "LatentCache":
        """A cache of `rows` rows over existing allocations (`storage()` of another cache), attending
        to `span` positions: what a compiled step builds around its inputs (span may be symbolic)."""
        view = object.__new__(cls)
        view._setup(config, num_sublayers, storage, rows, span)
        view.lengths = None
        return view

    # Views (sublayers, rows, max_len, d) of the first rows. Properties, so that a compiled step,
    # which only writes and slices, never reshapes by the allocation's row count: that would make it
    # a size, which torch.compile specialises when it is 1.
    @property
    def c_kv(self) -> torch.Tensor:
        return _rows(self._c, self.num_sublayers, self.rows)

    @property
    def k_rope(self) -> torch.Tensor:
        return _rows(self._r, self.num_sublayers, self.rows)

    @property
    def index_k(self) -> torch.Tensor | None:
        return None if self._i is None else _rows(self._i, self.config.num_layers, self.rows)

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The allocations (sublayers * allocated rows, max_len, d) of c_kv, k_rope, index keys."""
        return self._c, self._r, self._i

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype_bytes: int = 2, with_mtp: bool = False) -> int:
        per_sublayer = config.kv_lora_rank + config.qk_rope_head_dim
        n = 2 * config.num_layers + (config.mtp_num_layers if with_mtp else 0)
        index = config.num_layers * config.index_head_dim if config.lsa_enabled else 0
        return (n * per_sublayer + index) * dtype_bytes

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage() if t is not None)

    def begin(self, positions: torch.Tensor) -> None:
        """Called at the start of a forward: attention spans keys 0..max(pos)."""
        top = int(positions.max()) + 1
        if top > self.max_len:
            raise ValueError(
                f"position {top - 1} does not fit the cache of {self.max_len} tokens; "
                "allocate a larger cache (max_len) or shorten the prompt"
            )
        self._span = top

    @property
    def span(self):
        """Positions a forward attends over (0..span-1): set by begin(), or given to over()."""
        return self._span

    def _write(self, store: torch.Tensor, index: int, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """store[index] (rows, max_len, d) <- values (B, T, d) at positions (B|1, T); returns
        store[index][:, :span] (B, S, d)."""
        B, T, _ = values.shape
        # sliced by the allocation's rows, never reshaped (see the views above)
        R = store.shape[0] // (self.num_sublayers if store is not self._i else self.config.num_layers)
        at = (index * R + torch.arange(B, device=values.device)).unsqueeze(1)  # (B, 1) rows of the allocation
        store.index_put_((at, positions.expand(B, T)), values.to(store.dtype))
        return store[index * R : index * R + B, : self._span]

    def write(self, sublayer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor):
        return self._write(self._c, sublayer, positions, c_kv), self._write(self._r, sublayer, positions, k_rope)

    def write_index(self, layer: int, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._write(self._i, layer, positions, keys)

    def workspace(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor of `shape`, reused by every call with the same name (its previous contents
        are garbage). Sparse decode steps score every cached key into these instead of allocating
        context-sized tensors per step (fresh pages each time); grown by half again when too small,
        shared with narrowed views, freed with the cache."""
        need = math.prod(shape)
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < need or buf.dtype != dtype:
            grown = need if buf is None or buf.dtype != dtype else max(need, buf.numel() * 3 // 2)
            self._workspace.pop(name, None)  # release the old buffer before allocating its successor
            buf = self._workspace[name] = torch.empty(grown, dtype=dtype, device=self._c.device)
        return buf[:need].view(shape)

    def narrow(self, batch_size: int) -> "LatentCache":
        """A cache over the first `batch_size` rows that shares this cache's storage (no copy).

        The inference engine keeps one preallocated cache and runs batches of any size up to it.
        """
        if not 0 < batch_size <= self.allocated_rows:
            raise ValueError(f"cannot narrow a cache of {self.allocated_rows} rows to {batch_size}")
        view = LatentCache.over(self.config, self.storage(), batch_size, self._span, self.num_sublayers)
        view.lengths = self.lengths[:batch_size]
        view._workspace = self._workspace
        return view

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Row dst[j] takes the cached tokens of row src[j] (compacting a batch as sequences finish)."""
        self.c_kv[:, dst] = self.c_kv[:, src]
        self.k_rope[:, dst] = self.k_rope[:, src]
        if self.index_k is not None:
            self.index_k[:, dst] = self.index_k[:, src]
        self.lengths[dst] = self.lengths[src]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget sequences (all, or the given batch rows) so their slots can be reused."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0


def _rows(store: torch.Tensor, parts: int, rows) -> torch.Tensor:
    """(parts * R, max_len, d) -> the (parts, rows, max_len, d) view of its first rows of each part."""
    return store.view(parts, store.shape[0] // parts, store.shape[1], store.shape[2])[:, :rows]
