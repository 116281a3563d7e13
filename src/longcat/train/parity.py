"""The parity harness: short runs on synthetic data through the one training loop (`Trainer`).

A `RunSpec` describes a few steps of a preset on a learnable synthetic batch. `run_training(spec)`
runs it on every rank under torchrun (`longcat parallel check`, the parity tests), with the model
on `spec.layout`; `reference_run(spec)` runs the very same Trainer in this process without
torch.distributed: the yardstick every layout must match on the same global batch.

Fault handling and injection:
- resume: if the checkpoint directory holds a complete checkpoint, training continues from it (so
  a torchrun restart after a crashed rank picks up where the last checkpoint left off);
- `crash_at_step` kills one rank with SIGKILL right after that step (before its checkpoint), on
  the first attempt only;
- a non-finite loss or gradient norm on any rank skips the step on every rank (one all-reduced
  flag), and `nan_at_step` makes one rank's loss NaN at that step to test exactly that.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from ..config import ModelConfig, preset
from ..errors import UserError
from ..model.losses import LossWeights
from ..parallel.engine import setup
from ..parallel.layout import ParallelLayout
from .checkpoint import newest_complete
from .config import RunConfig, TrainConfig
from .trainer import EvalData, Trainer


@dataclass
class RunSpec:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # model config fields
    layout: str = ""
    steps: int = 10
    batch: int = 4  # global sequences per step
    seq_len: int = 16
    eval_batch: int = 0  # rows of the held-out batch (0 = batch); need not split over the ranks
    lr: float = 3e-3
    adam_eps: float = 1e-8
    seed: int = 0
    mtp_weight: float = 0.0
    z_loss: float = 0.0
    balance_loss: float = 0.0
    indexer_loss_weight: float = 0.0
    grad_clip: float = 1.0
    router_bias_rate: float = 1e-3
    precision: str = "fp32"  # FSDP parameter precision (MixedPrecisionPolicy): fp32, bf16, auto
    autocast: str = "none"  # "bf16": run forward under torch.autocast (the trainer's default on bf16 CPUs)
    device: str = "cpu"
    threads: int = 1
    peak_tflops: float = 0.0  # MFU denominator per device; 0 = measure
    out: str | None = None  # run directory (metrics.jsonl; checkpoints/ unless checkpoint_dir); None = a temp dir
    checkpoint_dir: str | None = None  # checkpoints here; resumes from the newest complete one
    checkpoint_every: int = 0  # 0: only the final checkpoint
    load_from: str | None = None  # start from this checkpoint (another layout's, to test resharding)
    resave_after_load: str | None = None  # right after loading, save again here (checks resharding)
    crash_at_step: int = 0  # SIGKILL `crash_rank` after this step, on the first attempt only
    crash_rank: int = 0
    nan_at_step: int = 0  # make `nan_rank`'s loss NaN at this step
    nan_rank: int = 0
    results: str | None = None  # rank 0 writes a JSON summary here
    log: str | None = None  # rank 0 appends one JSON line per step here (survives restarts)
    quiet: bool = False

    def model_config(self) -> ModelConfig:
        return preset(self.preset, **self.overrides)

    def run_config(self) -> RunConfig:
        """The Trainer's RunConfig: constant LR, AdamW, the final checkpoint and held-out eval only."""
        train = TrainConfig(
            seed=self.seed, steps=max(1, self.steps), seq_len=self.seq_len, micro_batch=self.batch, lr=self.lr,
            eps=self.adam_eps, warmup_steps=0, decay_fraction=0.0, grad_clip=self.grad_clip,
            mtp_weight=self.mtp_weight, z_loss=self.z_loss, balance_loss=self.balance_loss,
            indexer_loss_weight=self.indexer_loss_weight, router_bias_rate=self.router_bias_rate,
            precision="bf16" if self.autocast == "bf16" else "fp32", threads=self.threads, device=self.device,
            deterministic=False, eval_every=0, eval_batches=1, sample_tokens=0, log_every=0, progress=False,
            tensorboard=False, peak_tflops=self.peak_tflops, checkpoint_every=self.checkpoint_every,
            keep_checkpoints=2,
        )
        return RunConfig(model=self.model_config(), train=train)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


EVAL_STEP = -1  # the synthetic batch used for the held-out loss


def synthetic_batch(config: ModelConfig, batch: int, seq_len: int, seed: int, step: int):
    """A learnable global batch for step `step`: each row counts up with its own stride (mod V).

    Identical on every rank (seeded by seed and step), so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    V = config.vocab_size
    start = torch.randint(3, V, (batch, 1), generator=g)
    stride = torch.randint(1, 8, (batch, 1), generator=g)
    seq = (start + stride * torch.arange(seq_len + 1)) % (V - 3) + 3  # avoid pad/bos/eos ids
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


class SyntheticBatches:
    """The Trainer's batch source: synthetic_batch of step 0, 1, 2, ... (the state is the index)."""

    def __init__(self, spec: RunSpec, config: ModelConfig) -> None:
        self.spec, self.config, self.index = spec, config, 0

    def next_batch(self):
        batch = synthetic_batch(self.config, self.spec.batch, self.spec.seq_len, self.spec.seed, self.index)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


class _NaNOnThisRank:
    """Wraps a step engine: this rank's loss becomes NaN at one step, as if it alone had overflowed."""

    def __init__(self, engine, trainer, step: int) -> None:
        self._engine, self._trainer, self._step = engine, trainer, step

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward_backward(self, *args, **kwargs):
        result = self._engine.forward_backward(*args, **kwargs)
        if self._trainer.step + 1 == self._step:
            result.losses["loss_total"] = float("nan")
        return result


def _say(spec: RunSpec, text: str) -> None:
    if not spec.quiet:
        print(text, flush=True)


def _train(spec: RunSpec, out: Path, dims) -> tuple[dict, object]:
    """The Trainer on `dims` (None: this process alone) for spec; returns (summary, trainer)."""
    if spec.steps < 1 and not spec.load_from:
        raise UserError(f"steps={spec.steps}: train at least 1 step (0 only with load_from, to load and re-save)")
    run = spec.run_config()
    config = run.model
    checkpoint_dir = Path(spec.checkpoint_dir) if spec.checkpoint_dir else out / "checkpoints"
    resume = newest_complete(checkpoint_dir) is not None
    eval_rows = spec.eval_batch or spec.batch
    eval_data = EvalData(lambda: [synthetic_batch(config, eval_rows, spec.seq_len, spec.seed, EVAL_STEP)],
                         tokens=1, bytes=1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    losses: dict[int, float] = {}
    norms: dict[int, float] = {}
    skipped: list[int] = []

    def on_step(trainer, record) -> None:
        step = record["step"]
        losses[step], norms[step] = record["loss"], record["grad_norm"]
        if record["skipped"]:
            skipped.append(step)
        if trainer.is_main:
            _say(spec, f"step {step:>4}  loss {record['loss']:.6f}  grad_norm {record['grad_norm']:.4f}"
                       + ("  (skipped: non-finite on some rank)" if record["skipped"] else ""))
            if spec.log:
                with open(spec.log, "a") as f:
                    f.write(json.dumps({"step": step, "loss": record["loss"], "grad_norm": record["grad_norm"],
                                        "attempt": attempt, "skipped": record["skipped"]}) + "\n")
        if spec.crash_at_step and step == spec.crash_at_step and attempt == 0 and trainer.engine.rank == spec.crash_rank:
            _say(spec, f"[rank {trainer.engine.rank}] fault injection: killing this rank before step {step + 1}")
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(
        run, out, batches=SyntheticBatches(spec, config), eval_data=eval_data, on_step=on_step, dims=dims,
        console=Console(stderr=True, quiet=spec.quiet),
        param_precision=spec.precision, checkpoint_dir=checkpoint_dir, resume=resume,
        resume_from=None if resume or not spec.load_from else spec.load_from,
    )
    if spec.nan_at_step and (dims is None or trainer.engine.rank == spec.nan_rank):
        trainer.engine = _NaNOnThisRank(trainer.engine, trainer, spec.nan_at_step)
    start = trainer.step
    if trainer.resumed_from is not None and spec.resave_after_load:
        trainer.save(spec.resave_after_load)
    result = trainer.train()  # trains nothing when the loaded step is already the last
    summary = {
        "layout": trainer.engine.layout_name, "world_size": trainer.engine.world_size, "start_step": start,
        "attempt": attempt, "losses": losses, "grad_norms": norms, "skipped": skipped,
        "eval_loss": result.eval_loss, "tokens_per_s": result.tokens_per_s, "seconds": result.train_seconds,
        "final_checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }
    return summary, trainer


def run_training(spec: RunSpec) -> dict:
    """Train `spec.steps` steps on the layout `spec.layout` (call on every rank under torchrun)."""
    torch.set_num_threads(spec.threads)
    run = spec.run_config()
    layout = ParallelLayout.parse(spec.layout)
    dims = setup(layout, run.model, device=spec.device, seq_len=spec.seq_len, global_batch=spec.batch,
                 weights=LossWeights.from_train(run.train))
    if spec.out:
        summary, _ = _train(spec, Path(spec.out), dims)
    else:
        # every rank needs the same directory: rank 0 makes it, the others learn its name
        name = [tempfile.mkdtemp(prefix="longcat-check-") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(name, 0)
        summary, _ = _train(spec, Path(name[0]), dims)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(name[0], ignore_errors=True)
        if not spec.checkpoint_dir:
            summary["final_checkpoint"] = None  # it was in the temporary directory
    if dist.get_rank() == 0 and spec.results:
        Path(spec.results).write_text(json.dumps(summary))
    return summary


def reference_run(spec: RunSpec, *, return_trainer: bool = False):
    """The same spec through the same Trainer in this process (no torch.distributed), in a
    temporary directory. Returns the summary, or (summary, trainer) to inspect the final model."""
    with tempfile.TemporaryDirectory(prefix="longcat-reference-") as tmp:
        local = RunSpec(**{**asdict(spec), "out": tmp, "checkpoint_dir": None, "load_from": None,
                           "resave_after_load": None, "results": None, "log": None, "crash_at_step": 0,
                           "quiet": True})
        summary, trainer = _train(local, Path(tmp), None)
    return (summary, trainer) if return_trainer else summary


__all__ = ["RunSpec", "SyntheticBatches", "synthetic_batch", "run_training", "reference_run"]
