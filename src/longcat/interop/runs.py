"""What a directory is (model, training run, checkpoint) and which checkpoint of a run to read.

Training writes `OUT/checkpoints/step_N/` in one of two formats, both finished by a `COMPLETE`
marker written last (a crash mid-save leaves a directory without it, which is never picked):

- single process (`longcat.train.checkpoint`): `step_N/model/` is a model directory
  (config.json + model.safetensors, our names), next to optimizer.pt, trainer_state.json, ...
- several processes (`longcat.parallel.checkpoint`): `step_N/` holds DCP shards (`.metadata`,
  `*.distcp`; model tensors keyed `model.<our name>` with global shapes, optimizer under
  `optim.`), train_state.json and train_config.json.

Every entry point (`longcat.load`, `longcat generate`, `longcat convert`, resuming a run) finds
checkpoints with `newest_complete` and reads directories through `resolve`, so they agree on
what a directory is.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .safetensors_io import INDEX_NAME, SINGLE_NAME, CheckpointError

COMPLETE = "COMPLETE"
DCP_METADATA = ".metadata"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step_(\d+)")

# Kinds of directory `classify` recognises.
HF_MODEL = "hf_model"          # Hugging Face LongcatFlash: config.json with model_type/architectures
MODEL = "model"                # ours: config.json with ModelConfig fields + safetensors
RUN = "run"                    # a training output directory (OUT/) or its checkpoints/ folder
CHECKPOINT = "checkpoint"      # one single-process checkpoint step_N/ (weights in step_N/model/)
DCP_CHECKPOINT = "dcp_checkpoint"  # one multi-process checkpoint step_N/ (DCP shards)
KINDS = (HF_MODEL, MODEL, RUN, CHECKPOINT, DCP_CHECKPOINT)

_EXPECTED = ("a model directory (config.json + safetensors), a Hugging Face LongcatFlash directory, "
             "a training run directory (OUT with checkpoints/step_N), or one checkpoint step_N")


def step_of(path: str | os.PathLike) -> int | None:
    """N for a directory named step_N (any zero padding), else None."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(step_dir: str | os.PathLike) -> bool:
    return (Path(step_dir) / COMPLETE).is_file()


def list_complete(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint directly under checkpoint_dir, oldest first.

    Both formats count: single-process `step_N` and DCP `step_0000000N`. Leftovers of interrupted
    saves (`step_N.tmp-*`, `step_N.old-*`, or a step directory without COMPLETE) are skipped.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for d in checkpoint_dir.iterdir():
        step = step_of(d)
        if step is not None and d.is_dir() and is_complete(d):
            found.append((step, d))
    # the name breaks a tie between the two spellings of one step (a run resumed on another layout)
    return sorted(found, key=lambda sd: (sd[0], sd[1].name))


def newest_complete(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directly under checkpoint_dir (e.g. OUT/checkpoints), or None."""
    found = list_complete(checkpoint_dir)
    return found[-1][1] if found else None


def checkpoint_format(step_dir: str | os.PathLike) -> str:
    """CHECKPOINT (single process) or DCP_CHECKPOINT for a step directory; CheckpointError otherwise."""
    step_dir = Path(step_dir)
    if (step_dir / DCP_METADATA).is_file():
        return DCP_CHECKPOINT
    if (step_dir / "model" / "config.json").is_file():
        return CHECKPOINT
    raise CheckpointError(f"{step_dir} holds neither DCP shards ({DCP_METADATA}) nor model/config.json; "
                          "it is not a longcat training checkpoint")


def _has_weights(path: Path) -> bool:
    return (path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file() or any(path.glob("*.safetensors"))


def _checkpoints_folder(path: Path) -> Path | None:
    """The folder holding step_N directories for a run directory (OUT or OUT/checkpoints)."""
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS
    if any(step_of(d) is not None and d.is_dir() for d in path.iterdir()):
        return path
    return None


def classify(path: str | os.PathLike) -> str:
    """Which of KINDS `path` is; a CheckpointError naming what was expected for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist; give {_EXPECTED}")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is a file; give {_EXPECTED}")
    config = path / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config} is not a JSON object; expected a model config")
        if not _has_weights(path):
            raise CheckpointError(f"{path} has a config.json but no safetensors weights "
                                  f"(expected {SINGLE_NAME} or {INDEX_NAME})")
        from ..config import is_hf_config

        return HF_MODEL if is_hf_config(raw) else MODEL
    if step_of(path) is not None and ((path / DCP_METADATA).is_file() or (path / "model").is_dir()):
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: its save was "
                                  "interrupted); give the run directory to use its newest complete checkpoint")
        return checkpoint_format(path)
    if _checkpoints_folder(path) is not None:
        return RUN
    raise CheckpointError(f"{path} is not a model or a training run (no config.json, no checkpoints/); give {_EXPECTED}")


@dataclass(frozen=True)
class Resolved:
    """Where the weights of a model path are, after following a run to its newest checkpoint."""

    kind: str              # HF_MODEL, MODEL or DCP_CHECKPOINT: how to read `weights`
    weights: Path          # a model directory, or a DCP step directory
    given: Path            # the path as given
    checkpoint: Path | None = None  # the step_N directory when the weights come from a training run


def resolve(path: str | os.PathLike) -> Resolved:
    """Follow a run directory to its newest complete checkpoint, and a checkpoint to its weights."""
    given = Path(path)
    kind = classify(given)
    step_dir = None
    if kind == RUN:
        folder = _checkpoints_folder(given)
        step_dir = newest_complete(folder)
        if step_dir is None:
            raise CheckpointError(f"training run {given} has no complete checkpoint in {folder} (a save "
                                  "interrupted before its COMPLETE marker does not count); train at least until "
                                  "the first checkpoint (train.checkpoint_every) or give a model directory")
        kind = checkpoint_format(step_dir)
    elif kind in (CHECKPOINT, DCP_CHECKPOINT):
        step_dir = given
    if kind == CHECKPOINT:
        return Resolved(MODEL, step_dir / "model", given, step_dir)
    if kind == DCP_CHECKPOINT:
        return Resolved(DCP_CHECKPOINT, step_dir, given, step_dir)
    return Resolved(kind, given, given)


__all__ = [
    "COMPLETE", "DCP_METADATA", "CHECKPOINTS", "KINDS", "HF_MODEL", "MODEL", "RUN", "CHECKPOINT", "DCP_CHECKPOINT",
    "Resolved", "step_of", "is_complete", "list_complete", "newest_complete", "checkpoint_format", "classify",
    "resolve",
]
