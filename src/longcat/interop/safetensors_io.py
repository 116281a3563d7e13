"""Reading and writing safetensors directories: one file, or shards with an index.

Reading is lazy: opening a directory parses only the headers (every file's length is checked
against them, so a truncated shard is found before anything is allocated); tensors are then read
one at a time with positioned reads straight into their own buffers (`SafetensorsDir.get`), so no
file page stays mapped into the process and a load never holds more than the model it builds plus
one tensor, however large the checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Box reads (`SafetensorsDir.get_box`) read runs of contiguous bytes at least this long one by one;
# shorter runs are read as whole rows and cut in memory.
MIN_RUN_BYTES = 16 * 1024
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match the model."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file, from its header alone."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked against the file's length (nothing else is read)."""
    redo = "download or copy it again"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(f"{file} is truncated or not a safetensors file ({size} bytes, header length "
                                      f"{length}); {redo}")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}; check the path and permissions") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} has a corrupt safetensors header ({exc}); {redo}") from None
    base = 8 + length
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: the header entry of '{key}' is corrupt ({exc!r}); {redo}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{file}: '{key}' is {end - begin} bytes for shape {list(shape)} "
                                  f"{meta['dtype']}; the file is corrupt, {redo}")
        if base + end > size:
            raise CheckpointError(f"{file} is truncated: '{key}' ends at byte {base + end}, the file has {size}; {redo}")
        out[key] = TensorInfo(file, dtype, shape, base + begin, end - begin)
    return out


class SafetensorsDir:
    """Lazy view of the tensors in a directory (single file or sharded). Only headers are read
    until a tensor is asked for."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._files: dict[Path, BinaryIO] = {}
        self.path = Path(path)
        self.bytes_read = 0  # bytes read from disk so far (`get`, `get_box`)
        index = self.path / INDEX_NAME
        self.info: dict[str, TensorInfo] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc!r}); download it again") from None
            files = sorted({self.path / v for v in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"shard {', '.join(missing)} listed in {index} is missing; download it "
                                      "again (every shard the index names must be present)")
            headers = {f: read_header(f) for f in files}
            for key, name in weight_map.items():
                found = headers[self.path / name].get(key)
                if found is None:
                    raise CheckpointError(f"{index} puts '{key}' in {name}, which does not hold it; the index "
                                          "and the shards come from different downloads, fetch both again")
                self.info[key] = found
        else:
            single = self.path / SINGLE_NAME
            files = [single] if single.exists() else sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no safetensors weights in {self.path} (expected {SINGLE_NAME} or {INDEX_NAME})")
            for file in files:
                self.info.update(read_header(file))
        self.file_of = {k: i.file for k, i in self.info.items()}

    def keys(self) -> list[str]:
        return list(self.info)

    def __contains__(self, key: str) -> bool:
        return key in self.info

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())

    def _file(self, file: Path) -> BinaryIO:
        if file not in self._files:
            self._files[file] = open(file, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        return self._files[file]

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, read from its file into memory of its own.

        A positioned read straight into the tensor's buffer: no page of the file stays mapped into
        this process (a memory map would keep whatever the page cache hands it, up to whole large
        folios, resident), so a load holds the weights read so far plus one tensor in flight."""
        info = self.info[key]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        self._read_into(key, buffer, info.start)
        return buffer.view(info.dtype).view(info.shape)

    def _read_into(self, key: str, buffer: torch.Tensor, start: int) -> None:
        """Fill uint8 `buffer` from byte `start` of the file holding `key` (one positioned read)."""
        n = buffer.numel()
        if not n:
            return
        info = self.info[key]
        read = os.preadv(self._file(info.file).fileno(), [buffer.numpy()], start)
        self.bytes_read += read
        if read != n:
            raise CheckpointError(f"{info.file} ends inside tensor '{key}' (read {read} of {n} bytes): "
                                  "the file is truncated; download it again")

    def get_box(self, key: str, offset: tuple[int, ...], size: tuple[int, ...], *,
                min_run_bytes: int | None = None) -> torch.Tensor:
        """The box `[offset, offset + size)` of tensor `key`, reading only the bytes it spans.

        A box that is whole in every dimension after its first is one contiguous byte range (one
        read). Otherwise each run of contiguous elements is read on its own when a run is at
        least `min_run_bytes` (default MIN_RUN_BYTES), so a rank reading half of every row reads
        half the bytes; shorter runs are read as the whole rows of the first dimension and cut in
        memory, since many tiny reads cost more than the bytes they skip."""
        info = self.info[key]
        shape = info.shape
        if len(offset) != len(shape) or len(size) != len(shape) or any(
                o < 0 or n < 0 or o + n > d for o, n, d in zip(offset, size, shape)):
            raise ValueError(f"box at {tuple(offset)} of size {tuple(size)} is outside '{key}' of shape {shape}")
        if tuple(size) == shape:
            return self.get(key)
        item = info.dtype.itemsize
        out = torch.empty(math.prod(size) * item, dtype=torch.uint8)
        if out.numel() == 0:
            return out.view(info.dtype).view(tuple(size))
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]  # elements per step of each dim
        # k: the last dimension the box cuts; every dimension after it is whole, so runs are contiguous
        k = max(d for d in range(len(shape)) if size[d] != shape[d])
        run = size[k] * strides[k] * item
        runs = math.prod(size[:k])
        threshold = MIN_RUN_BYTES if min_run_bytes is None else min_run_bytes
        if runs == 1 or run >= threshold:
            for i, index in enumerate(itertools.product(*(range(o, o + n) for o, n in zip(offset[:k], size[:k])))):
                first = sum(j * s for j, s in zip(index, strides)) + offset[k] * strides[k]
                self._read_into(key, out[i * run:(i + 1) * run], info.start + first * item)
            return out.view(info.dtype).view(tuple(size))
        # short runs: read the rows [offset[0], offset[0] + size[0]) whole, cut the box in memory
        rows = torch.empty(size[0] * strides[0] * item, dtype=torch.uint8)
        self._read_into(key, rows, info.start + offset[0] * strides[0] * item)
        whole = rows.view(info.dtype).view((size[0], *shape[1:]))
        box = whole[(slice(None), *(slice(o, o + n) for o, n in zip(offset[1:], size[1:])))]
        return box.contiguous()

    @contextmanager
    def view(self, key: str) -> Iterator[torch.Tensor]:
        """The tensor `key`, valid inside the `with` (its memory is freed when the caller drops it)."""
        yield self.get(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.info:
            yield key, self.get(key)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        self.close()




def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]], path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as model.safetensors, or as shards plus an index when larger than one shard.

    Streams: a shard is written as soon as it is full, so at most one shard's tensors are held.
    Shards are named model-0000i.safetensors while writing and renamed model-0000i-of-0000n once n
    is known."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        file = path / f"model-{len(written) + 1:05d}.safetensors.partial"
        save_file(shard, str(file), metadata=meta)
        written.append((file, list(shard)))
        shard, size = {}, 0

    for name, t in tensors:
        n = t.numel() * t.element_size()
        if shard and size + n > max_shard_bytes:
            flush()
        # clone: slices of one stacked tensor share storage, which safetensors refuses
        shard[name] = t.detach().contiguous().clone()
        size += n
        total += n
    if not written:
        out = path / SINGLE_NAME
        save_file(shard, str(out), metadata=meta)
        return [out]
    if shard:
        flush()
    files, weight_map = [], {}
    for i, (file, keys) in enumerate(written, start=1):
        final = path / f"model-{i:05d}-of-{len(written):05d}.safetensors"
        file.rename(final)
        files.append(final)
        weight_map.update({k: final.name for k in keys})
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files
