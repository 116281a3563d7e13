"""Preallocated latent KV cache: per attention sublayer, `[c_kv, k_rope]` for every token.

That is kv_lora + rope values per token per sublayer (576 at LongCat sizes) instead of
heads * (nope + rope + v) for an expanded per-head cache. Sublayers are numbered 2*i and 2*i+1 for
decoder layer i, then 2*L + d for MTP depth d. LSA layers also cache their indexer keys.
"""

from __future__ import annotations

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
        self.config = config
        self.max_len = max_len
        self.num_sublayers = 2 * config.num_layers + (config.mtp_num_layers if with_mtp else 0)
        shape = (self.num_sublayers, batch_size, max_len)
        self.c_kv = torch.zeros(*shape, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(*shape, config.qk_rope_head_dim, dtype=dtype, device=device)
        self.index_k = None
        if config.lsa_enabled:
            self.index_k = torch.zeros(
                config.num_layers, batch_size, max_len, config.index_head_dim, dtype=dtype, device=device
            )
        # Tokens cached per sequence; maintained by the caller (the inference engine).
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._span = max_len
        # rows of the allocation, which narrowed views share (rows 0..allocated_rows-1, same strides)
        self.allocated_rows = batch_size

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype_bytes: int = 2, with_mtp: bool = False) -> int:
        per_sublayer = config.kv_lora_rank + config.qk_rope_head_dim
        n = 2 * config.num_layers + (config.mtp_num_layers if with_mtp else 0)
        index = config.num_layers * config.index_head_dim if config.lsa_enabled else 0
        return (n * per_sublayer + index) * dtype_bytes

    def nbytes(self) -> int:
        total = self.c_kv.numel() * self.c_kv.element_size() + self.k_rope.numel() * self.k_rope.element_size()
        if self.index_k is not None:
            total += self.index_k.numel() * self.index_k.element_size()
        return total

    def begin(self, positions: torch.Tensor) -> None:
        """Called by the model at the start of a forward: attention spans keys 0..max(pos)."""
        top = int(positions.max()) + 1
        if top > self.max_len:
            raise ValueError(
                f"position {top - 1} does not fit the cache of {self.max_len} tokens; "
                "allocate a larger cache (max_len) or shorten the prompt"
            )
        self._span = top

    def _scatter(self, store: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """store (B, S, d) <- values (B, T, d) at positions (B, T); returns store[:, :span]."""
        B, T, d = values.shape
        index = positions.expand(B, T).unsqueeze(-1).expand(B, T, d)
        store.scatter_(1, index, values.to(store.dtype))
        return store[:, : self._span]

    def write(self, sublayer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor):
        return (
            self._scatter(self.c_kv[sublayer], positions, c_kv),
            self._scatter(self.k_rope[sublayer], positions, k_rope),
        )

    def write_index(self, layer: int, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._scatter(self.index_k[layer], positions, keys)

    def narrow(self, batch_size: int) -> "LatentCache":
        """A cache over the first `batch_size` rows that shares this cache's storage (no copy).

        The inference engine keeps one preallocated cache and runs batches of any size up to it.
        """
        if not 0 < batch_size <= self.c_kv.shape[1]:
            raise ValueError(f"cannot narrow a cache of {self.c_kv.shape[1]} rows to {batch_size}")
        view = object.__new__(LatentCache)
        view.config, view.max_len, view.num_sublayers = self.config, self.max_len, self.num_sublayers
        view.allocated_rows = self.allocated_rows
        view.c_kv = self.c_kv[:, :batch_size]
        view.k_rope = self.k_rope[:, :batch_size]
        view.index_k = None if self.index_k is None else self.index_k[:, :batch_size]
        view.lengths = self.lengths[:batch_size]
        view._span = self._span
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
