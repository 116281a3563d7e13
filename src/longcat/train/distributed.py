"""`longcat train` on several processes: the same Trainer, on a `longcat.parallel` layout.

`longcat train --nproc N --parallel LAYOUT` validates the layout, then re-runs itself under
torchrun (`longcat.parallel.run_under_torchrun`); every worker (or every process of a
`torchrun ... -m longcat.train ...` launch on many nodes) runs `train_distributed`, which sets up
the process group and mesh, prepares the data (rank 0 first: it trains or loads the tokenizer and
fills the token cache, the others then read them) and runs `Trainer(..., dims=dims)`: the loop,
recipe, metrics record and summary of a one-process run. Every rank builds only its shard of the
model (meta-device construction, `longcat.parallel.parallelize`) and reads only its data rank's
rows of the global batch of `micro_batch` sequences (`build_trainer`); rank 0 alone writes
metrics.jsonl; checkpoints are DCP directories OUT/checkpoints/step_N (with
train_config.json and tokenizer.json, written before the COMPLETE marker); text samples are
skipped (the model is sharded). AdamW only.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from .config import RunConfig
from .engine import LossWeights
from .trainer import TrainResult


def check_parallel_run(run: RunConfig, layout_text: str | None, world_size: int):
    """Everything a worker would reject, rejected before any process starts. Returns the layout."""
    from ..parallel.layout import ParallelLayout

    cfg = run.train
    if cfg.optimizer != "adamw":
        raise ConfigError(f"train.optimizer={cfg.optimizer!r} is not supported with --parallel/--nproc "
                          "(Muon needs whole matrices); use --set train.optimizer=adamw")
    layout = ParallelLayout.parse(layout_text or f"dp_shard={world_size}")
    w = LossWeights.from_train(cfg)
    layout.validate(run.model, world_size, seq_len=cfg.seq_len, global_batch=cfg.micro_batch,
                    with_mtp=w.with_mtp(run.model), with_indexer_loss=w.with_indexer(run.model),
                    with_aux_losses=w.any_aux)
    return layout


def train_distributed(run: RunConfig, out_dir: Path, *, layout_text: str | None, resume: bool, console) -> TrainResult:
    """Call on every rank under torchrun."""
    import torch.distributed as dist

    from ..parallel.engine import setup, world_size_from_env
    from .run import build_trainer, prepare_data, with_tokenizer_ids

    cfg = run.train
    out_dir = Path(out_dir)
    layout = check_parallel_run(run, layout_text, world_size_from_env())
    dims = setup(layout, run.model, device=cfg.device, seq_len=cfg.seq_len, global_batch=cfg.micro_batch,
                 weights=LossWeights.from_train(cfg))
    rank = dist.get_rank()
    if rank == 0:
        data = prepare_data(run, out_dir, resume=resume, console=console)
    dist.barrier()
    if rank != 0:
        if not resume and not cfg.tokenizer:
            run_local = RunConfig(run.model, cfg.replace(tokenizer=str(out_dir / "tokenizer.json")))
        else:
            run_local = run
        data = prepare_data(run_local, out_dir, resume=resume, console=console)
    run = with_tokenizer_ids(run, data.tokenizer)
    if rank == 0:
        console.print(f"layout {layout} on {dims.mesh.size()} ranks; global batch {cfg.micro_batch}x{cfg.seq_len} "
                      f"per micro-batch, {cfg.grad_accum} micro-batch(es) per step; text samples are skipped "
                      "(sharded model)", highlight=False, markup=False)
    trainer = build_trainer(run, out_dir, data, resume=resume, console=console, dims=dims)
    return trainer.train()


__all__ = ["check_parallel_run", "train_distributed"]
