"""Our own model directory: config.json (ModelConfig fields) + model.safetensors (our names).

Training checkpoints (`OUT/checkpoints/step_N/`) hold one of these plus optimizer state; `load`
accepts either a model directory, a checkpoint directory, or a run directory (newest complete
checkpoint).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..config import ConfigError, from_dict
from ..model import LongCatForCausalLM
from .safetensors_io import CheckpointError, SafetensorsDir, write_sharded

COMPLETE_MARKER = "COMPLETE"


def save_model(model: LongCatForCausalLM, path: str | os.PathLike, *, tokenizer_json: str | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    write_sharded(((k, v.detach().cpu()) for k, v in state.items()), path, metadata={"longcat": "1"})
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def load_model(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> LongCatForCausalLM:
    from .hf import _materialize

    path = Path(path)
    try:
        config = from_dict(json.loads((path / "config.json").read_text()), source=str(path / "config.json"))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    source = SafetensorsDir(path)
    state = dict(source.items())
    return _materialize(config, state, device, dtype, str(path))


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete `step_N` directory under run_dir or run_dir/checkpoints."""
    run_dir = Path(run_dir)
    candidates = []
    for base in (run_dir, run_dir / "checkpoints"):
        if not base.is_dir():
            continue
        for d in base.iterdir():
            m = re.fullmatch(r"step_(\d+)", d.name)
            if m and d.is_dir() and (d / COMPLETE_MARKER).exists():
                candidates.append((int(m.group(1)), d))
    if not candidates:
        return None
    step, d = max(candidates)
    return d / "model" if (d / "model" / "config.json").exists() else d
