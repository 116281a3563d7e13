"""Training checkpoints: OUT/checkpoints/step_N/, written atomically.

Layout of one checkpoint:

    step_N/model/config.json, model.safetensors, tokenizer.json   (longcat.interop.native layout)
    step_N/optimizer.pt        optimizer state (torch.save)
    step_N/trainer_state.json  step, tokens seen, elapsed time, schedule, sampler state, counters
    step_N/rng.pt              python, numpy and torch RNG states
    step_N/train_config.json   the RunConfig ({"model": ..., "train": ...})
    step_N/COMPLETE            written last

Atomicity: everything is written into `step_N.tmp-XXXX` next to it, every file and the directory
are fsynced, `COMPLETE` is written, then the directory is renamed to `step_N` (and the parent
fsynced). A crash or a full disk at any point leaves at most a `*.tmp-*` directory, which
`newest_complete` never picks and the next save removes; the previous `step_M` is untouched.

`newest_complete` and `list_checkpoints` are `longcat.interop.runs`' (re-exported here): one
finder for these and the multi-process (DCP) checkpoints alike.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..interop.native import save_model
from ..interop.runs import COMPLETE, newest_complete, step_of
from ..interop.runs import list_complete as list_checkpoints
from ..interop.safetensors_io import SafetensorsDir


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the previous checkpoints are intact."""


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_partial(checkpoint_dir: Path) -> None:
    """Delete leftovers of interrupted saves (`*.tmp-*`, and step dirs without COMPLETE)."""
    if not checkpoint_dir.is_dir():
        return
    for d in checkpoint_dir.iterdir():
        if not d.is_dir():
            continue
        if ".old-" in d.name:
            # a crash between the two renames of a re-save: the old copy is the good one
            original = checkpoint_dir / d.name.split(".old-")[0]
            if not original.exists() and (d / COMPLETE).exists():
                os.rename(d, original)
            else:
                shutil.rmtree(d, ignore_errors=True)
        elif ".tmp-" in d.name or (step_of(d) is not None and not (d / COMPLETE).exists()):
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer_state: dict,
    trainer_state: dict,
    run_config_json: str,
    tokenizer_json: str | None,
    keep: int,
) -> Path:
    """Write step_N atomically, then keep only the newest `keep` complete checkpoints."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(checkpoint_dir)
    final = checkpoint_dir / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"step_{step}.tmp-", dir=checkpoint_dir))
    try:
        save_model(model, tmp / "model", tokenizer_json=tokenizer_json)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        _write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
        _write_text(tmp / "train_config.json", run_config_json)
        if tokenizer_json is not None:
            _write_text(tmp / "tokenizer.json", tokenizer_json)
        _fsync_tree(tmp)
        _write_text(tmp / COMPLETE, f"step {step}\n")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
            old = checkpoint_dir / f"step_{step}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(checkpoint_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        last = newest_complete(checkpoint_dir)
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        kept = f"the last good checkpoint {last} is intact" if last else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"could not write checkpoint step_{step} in {checkpoint_dir}: {reason}; {kept}. "
            "Free space (or fix the directory) and rerun with --resume."
        ) from exc
    for _, old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_state(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load the weights of `checkpoint/model` into `model` in place (exact bits)."""
    source = SafetensorsDir(checkpoint / "model")
    state = {k: v for k, v in source.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Everything but the weights: optimizer state, trainer state, RNG state, run config JSON."""
    return {
        "optimizer": torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(checkpoint / "rng.pt", weights_only=False),
        "trainer_state": json.loads((checkpoint / "trainer_state.json").read_text()),
        "run_config": json.loads((checkpoint / "train_config.json").read_text()),
    }


__all__ = [
    "COMPLETE", "CheckpointSaveError", "list_checkpoints", "newest_complete", "remove_partial",
    "save_checkpoint", "load_checkpoint", "load_model_state", "rng_state", "set_rng_state",
]
