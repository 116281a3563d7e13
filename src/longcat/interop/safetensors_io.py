"""Reading and writing safetensors directories: one file, or shards with an index."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match the model."""


class SafetensorsDir:
    """Lazy view of the tensors in a directory (single file or sharded). Nothing is read until asked."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            self.file_of = {k: self.path / v for k, v in weight_map.items()}
            missing = sorted({str(f) for f in self.file_of.values() if not f.exists()})
            if missing:
                raise CheckpointError(f"shards listed in {index} are missing: {', '.join(missing)}")
        elif (self.path / SINGLE_NAME).exists():
            file = self.path / SINGLE_NAME
            with safe_open(file, "pt") as f:
                self.file_of = {k: file for k in f.keys()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no safetensors weights in {self.path} (expected {SINGLE_NAME} or {INDEX_NAME})")
            self.file_of = {}
            for file in files:
                with safe_open(file, "pt") as f:
                    self.file_of.update({k: file for k in f.keys()})

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.file_of[key], "pt") as f:
            return f.get_tensor(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for k, file in self.file_of.items():
            by_file.setdefault(file, []).append(k)
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:
                for k in keys:
                    yield k, f.get_tensor(k)


def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]], path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as model.safetensors, or as shards plus an index when larger than one shard."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        # clone: slices of one stacked tensor share storage, which safetensors refuses
        shards[-1][name] = t.detach().contiguous().clone()
        size += n
        total += n
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        out = path / SINGLE_NAME
        save_file(shards[0], str(out), metadata=meta)
        return [out]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        files.append(path / name)
        weight_map.update({k: name for k in shard})
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files
