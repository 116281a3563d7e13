"""Our own model directory: config.json (ModelConfig fields) + model.safetensors (our names).

Single-process training checkpoints (`OUT/checkpoints/step_N/`) hold one of these in
`step_N/model/`; `longcat.interop.runs` finds them and `longcat.interop.loader.load` reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import ConfigError, from_dict
from ..model import LongCatForCausalLM
from .materialize import Part, Planned, materialize
from .safetensors_io import CheckpointError, SafetensorsDir, write_sharded


def save_model(model: LongCatForCausalLM, path: str | os.PathLike, *, tokenizer_json: str | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    write_sharded(((k, v.detach().cpu()) for k, v in state.items()), path, metadata={"longcat": "1"})
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def load_model(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
               weights_dtype: str | None = None) -> LongCatForCausalLM:
    path = Path(path)
    try:
        config = from_dict(json.loads((path / "config.json").read_text()), source=str(path / "config.json"))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    source = SafetensorsDir(path)
    state = {key: Planned(source, [Part(key)]) for key in source.keys()}  # read lazily, one at a time
    try:
        return materialize(config, state, device=device, dtype=dtype, weights_dtype=weights_dtype, origin=str(path))
    finally:
        source.close()


__all__ = ["save_model", "load_model"]
