"""Pre-training: config, optimizers and schedule, the training loop, checkpoints, metrics, samples.

    TrainConfig / RunConfig      the recipe (+ the architecture); TOML files and --set overrides
    Trainer(run, out, batches=)  the loop, for one process or (dims=) N ranks on a parallel layout:
                                 bf16 autocast, accumulation, clipping, router bias, evals, checkpoints
    LocalEngine / StepEngine     what the Trainer asks of a model (engine.py); ParallelModel is the N-rank one
    save_checkpoint / newest_complete   atomic OUT/checkpoints/step_N/ with a COMPLETE marker
    sample_text                  full-recompute sampling for periodic samples and the demo
    parity.RunSpec / run_training / reference_run
                                 the parity harness: a few synthetic steps on a layout under torchrun
                                 (parity_worker.py on every rank), and the same Trainer in one process

`longcat train` and `longcat demo` (cli.py) wire these to longcat.data; `longcat parallel check`
(parity_cli.py) runs the parity harness.
"""

from .checkpoint import CheckpointSaveError, newest_complete, save_checkpoint
from .config import RunConfig, TrainConfig, build_run_config
from .engine import LocalEngine, LossWeights, StepEngine, StepResult, router_target_share, update_router_bias
from .sample import generate_ids, sample_text
from .trainer import EvalData, Trainer, TrainingError, TrainResult

__all__ = [
    "CheckpointSaveError", "EvalData", "LocalEngine", "LossWeights", "RunConfig", "StepEngine", "StepResult",
    "TrainConfig", "Trainer", "TrainingError", "TrainResult", "build_run_config", "generate_ids",
    "newest_complete", "router_target_share", "sample_text", "save_checkpoint", "update_router_bias",
]
