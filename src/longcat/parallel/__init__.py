"""Scale-out on torch.distributed: FSDP2, expert, tensor, context and pipeline parallelism.

The model code stays free of distributed code; `parallelize` applies the plans to a built model
(TorchTitan's order: pipeline split, TP, EP, CP, then FSDP). The training loop is
`longcat.train.Trainer`, given the `ParallelDims` of `setup`. See docs/PARALLEL.md.

Names are imported lazily: `import longcat.parallel` stays cheap for the CLI.
"""

import importlib

_EXPORTS = {
    "ParallelLayout": "layout", "ParallelDims": "layout", "init_distributed": "layout",
    "shutdown_distributed": "layout",
    "setup": "engine", "parallelize": "engine", "ParallelModel": "engine", "LossWeights": "engine",
    "StepResult": "engine",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "launch": "launch", "run_under_torchrun": "launch", "is_torchrun_worker": "launch",
    "setup_inference": "inference", "load_for_inference": "inference", "shard_for_inference": "inference",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
