"""Read the model out of a multi-process (DCP) training checkpoint, in one process.

`longcat.parallel.save_checkpoint` stores `{"model": ..., "optim": ...}` with
torch.distributed.checkpoint: every tensor under `model.<our parameter name>` with its global
shape, whatever the layout (FSDP, TP and EP shards are DTensors; pipeline stages keep the full
model's names and each rank writes its own layers). So one process can read every `model.*`
tensor whole without a process group, strip the prefix, and assign them to a model built on the
meta device. The model config comes from `train_config.json` next to the shards.

Pipeline-parallel runs train no MTP heads (the stages hold none), so their checkpoints have no
`mtp.*` tensors; such a checkpoint loads without MTP heads, with a warning.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, from_dict
from ..model import LongCatForCausalLM
from .materialize import materialize
from .safetensors_io import CheckpointError

TRAIN_CONFIG = "train_config.json"
MODEL_PREFIX = "model."


def dcp_model_config(step_dir: str | os.PathLike) -> ModelConfig:
    """The model config a DCP checkpoint was trained with (the [model] table of train_config.json)."""
    path = Path(step_dir) / TRAIN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{step_dir} has DCP shards but no {TRAIN_CONFIG}, so its model config is unknown "
                              "(checkpoints of `longcat parallel check` hold none); load checkpoints written by "
                              "`longcat train`")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path} has no [model] table; expected the RunConfig `longcat train` writes")
    try:
        return from_dict(raw["model"], source=f"{path} [model]")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def read_dcp_model_state(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint, whole, on the CPU, under our parameter names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    step_dir = Path(step_dir)
    try:
        metadata = dcp.FileSystemReader(str(step_dir)).read_metadata()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read the DCP metadata of {step_dir}: {exc}") from exc
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{step_dir} holds no model tensors (no '{MODEL_PREFIX}*' keys in its DCP metadata)")
    with warnings.catch_warnings():
        # dcp says it assumes a single process: that is the point here
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    return {key[len(MODEL_PREFIX):]: t for key, t in state.items()}


def load_dcp(step_dir: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
             weights_dtype: str | None = None) -> LongCatForCausalLM:
    """The model of one DCP training checkpoint directory (step_N with .metadata and COMPLETE)."""
    step_dir = Path(step_dir)
    config = dcp_model_config(step_dir)
    state = read_dcp_model_state(step_dir)
    if config.mtp_num_layers and not any(k.startswith("mtp.") for k in state):
        warnings.warn(f"{step_dir} has no MTP weights (a pipeline-parallel run trains none); loading without "
                      "MTP heads (mtp_num_layers=0)", stacklevel=2)
        config = config.replace(mtp_num_layers=0)
    return materialize(config, state, device=device, dtype=dtype, weights_dtype=weights_dtype, origin=str(step_dir))


__all__ = ["load_dcp", "read_dcp_model_state", "dcp_model_config", "TRAIN_CONFIG", "MODEL_PREFIX"]
