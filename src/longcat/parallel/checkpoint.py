"""Distributed checkpoints (torch.distributed.checkpoint) that move between layouts.

A checkpoint is a directory `step_00000010/` holding DCP shards of the model and optimizer state
(keyed by the full model's parameter names, each tensor stored with its global shape), plus
`train_state.json` (step, data position, anything JSON) and a `COMPLETE` marker written last.
Because DCP records global shapes and `get_state_dict`/`set_state_dict` translate to and from
FSDP/TP/EP shards, a run saved on one layout resumes on another: 2 ranks -> 1, 1 -> 2,
FSDP -> FSDP+EP, pipelined <-> flat. Loading reads only the bytes each rank needs.

Finding the newest complete checkpoint is `longcat.interop.runs.newest_complete` (one finder for
these and the single-process checkpoints); reading the model out of one in a single process,
without a process group, is `longcat.load` (`longcat.interop.dcp`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..interop.runs import COMPLETE as MARKER
from ..interop.runs import DCP_CHECKPOINT, checkpoint_format, list_complete, newest_complete
from ..interop.safetensors_io import CheckpointError

STATE_FILE = "train_state.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save_checkpoint(root: str | Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                    train_state: dict | None = None, *, keep: int = 0,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    `extra_files` ({name: text}, e.g. train_config.json and tokenizer.json) are written by rank 0
    before the COMPLETE marker, so a reader that sees the marker also sees them.
    """
    path = step_dir(root, step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a stale, incomplete save of the same step
    _barrier()
    model_sd, optim_sd = _state(module, optimizer)
    state = {"model": model_sd}
    if optim_sd is not None:
        state["optim"] = optim_sd
    dcp.save(state, checkpoint_id=str(path))
    if rank == 0:
        (path / STATE_FILE).write_text(json.dumps({"step": step, **(train_state or {})}, indent=1))
        for name, text in (extra_files or {}).items():
            (path / name).write_text(text)
        (path / MARKER).write_text("ok\n")
        if keep > 0:
            for _, old in list_complete(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Collective: fill the (already parallelized) module and optimizer; returns train_state.json."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise CheckpointError(f"{path} is not a complete distributed checkpoint (no {MARKER} marker: its save was "
                              "interrupted); resume from the newest complete one (newest_complete of its folder)")
    if checkpoint_format(path) != DCP_CHECKPOINT:
        raise CheckpointError(f"{path} is a single-process checkpoint, which a multi-process run cannot resume; "
                              "continue that run with one process (no --nproc/--parallel) or start a new --out")
    model_sd, optim_sd = _state(module, optimizer)
    state = {"model": model_sd}
    if optim_sd is not None:
        # get_state_dict creates optimizer state for every parameter; parameters that had none
        # when saved (never had a gradient: MTP heads or the indexer trained without their loss)
        # must stay without state, or their Adam step count would differ from the saved run.
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        per_param = optim_sd["state"]
        for fqn in [f for f, st in per_param.items() if any(f"optim.state.{f}.{k}" not in saved for k in st)]:
            del per_param[fqn]
        state["optim"] = optim_sd
    dcp.load(state, checkpoint_id=str(path))
    # strict=False only lets parameters without saved optimizer state stay without state; the
    # model keys were already checked by dcp.load, which fails on any missing key.
    options = StateDictOptions(strict=False)
    if optimizer is not None:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
    else:
        set_state_dict(module, [], model_state_dict=state["model"], optim_state_dict={}, options=options)
    return json.loads((path / STATE_FILE).read_text())


def _state(module: nn.Module, optimizer):
    if optimizer is None:
        model_sd, _ = get_state_dict(module, [])
        return model_sd, None
    return get_state_dict(module, optimizer)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


__all__ = ["save_checkpoint", "load_checkpoint", "newest_complete", "step_dir", "MARKER", "STATE_FILE"]
