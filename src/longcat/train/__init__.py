"""Pre-training: config, optimizers and schedule, the training loop, checkpoints, metrics, samples.

    TrainConfig / RunConfig      the recipe (+ the architecture); TOML files and --set overrides
    Trainer(run, out, batches=)  the loop: bf16 autocast, accumulation, clipping, router bias, evals
    save_checkpoint / newest_complete   atomic OUT/checkpoints/step_N/ with a COMPLETE marker
    sample_text                  full-recompute sampling for periodic samples and the demo

`longcat train` and `longcat demo` (cli.py) wire these to longcat.data.
"""

from .checkpoint import CheckpointSaveError, newest_complete, save_checkpoint
from .config import RunConfig, TrainConfig, build_run_config
from .sample import generate_ids, sample_text
from .trainer import EvalData, Trainer, TrainingError, TrainResult, router_target_share, update_router_bias

__all__ = [
    "CheckpointSaveError", "EvalData", "RunConfig", "TrainConfig", "Trainer", "TrainingError", "TrainResult",
    "build_run_config", "generate_ids", "newest_complete", "router_target_share", "sample_text",
    "save_checkpoint", "update_router_bias",
]
