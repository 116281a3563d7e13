"""The training loop, for one process and for N ranks alike. One optimizer step, top to bottom,
is `Trainer._step`.

Per optimizer step:
1. LR from the warmup-stable-decay schedule (optim.py).
2. `grad_accum` micro-batches through the step engine (engine.py): forward under bf16 autocast
   (fp32 master weights), loss = `longcat.model.training_losses` (lm + mtp_weight * mean(mtp_d)
   + z_loss * mean(h^2) + balance_loss * router balance loss + indexer_loss_weight * LSA indexer
   KL); backward of loss / grad_accum.
3. Global grad-norm clipping. A non-finite loss or grad norm (on any rank) skips the step on every
   rank (no update, no router bias change), counts it, and stops the run after
   `max_skipped_steps` consecutive ones.
4. Optimizer step, then the router bias update from the step's (global) routing counts
   (`update_router_bias`).
5. One metrics record; periodic held-out eval, sample text and checkpoint (in that order, so a
   checkpoint at step N follows every record of step N).

Where the model lives is the engine's business: `LocalEngine` (one process) or, when the Trainer
is given the `ParallelDims` of `longcat.parallel.setup`, `longcat.parallel.ParallelModel` on that
layout. Every rank then feeds the same global batch (the engine takes its share), rank 0 alone
writes metrics.jsonl, and checkpoints are DCP directories that load on any layout.

Exact resume: model, optimizer, schedule clock, sampler and (one process) RNG states are
checkpointed, and nothing outside the training step draws from the global RNG (samples use their
own generator). On CPU, with the same thread count, a resumed run repeats the uninterrupted run's
losses bit for bit.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

import numpy as np
import torch

from ..config import ConfigError, ModelConfig, from_dict
from ..devices import resolve_device, synchronize
from ..model import build_model
from ..model.count import count_parameters
from ..telemetry import Telemetry
from . import checkpoint as ckpt
from .config import RunConfig
from .engine import LocalEngine, LossWeights, StepEngine, update_router_bias
from .metrics import MetricsLog, flops_per_token, measure_peak_flops, peak_memory_gib, plot_loss_curve
from .optim import WSDSchedule, build_optimizers
from .sample import sample_text

if TYPE_CHECKING:
    from ..parallel.layout import ParallelDims


class TrainingError(RuntimeError):
    """The run cannot continue (diverged, checkpoint write failed, ...). The message says why."""


class BatchSource(Protocol):
    """What the trainer needs from longcat.data.PackedBatches."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class EvalData:
    """Held-out data: a factory of (inputs, labels) batches and the token/byte sizes for bpb."""

    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    tokens: int  # tokens in the held-out split
    bytes: int  # UTF-8 bytes of the held-out split

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / max(1, self.bytes)


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    stopped: str  # "steps", "time_budget"
    eval_loss: float | None = None
    bpb: float | None = None
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    mfu_peak_flops: float = 0.0
    mfu_peak_source: str = ""
    train_seconds: float = 0.0
    checkpoint: Path | None = None
    metrics: Path | None = None
    plot: Path | None = None
    plot_note: str | None = None
    sample: str | None = None
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    return torch.bfloat16


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: checkpoint {db[k]!r} vs this run {da[k]!r}" for k in da if da[k] != db.get(k)]


class Trainer:
    """One training run. `dims` (from `longcat.parallel.setup`) puts the model on that layout over
    the ranks of the process group; without it the model stays in this process.

    `param_precision` is FSDP's parameter dtype on a layout (fp32, bf16 or auto, see
    `longcat.parallel.parallelize`); `checkpoint_dir` defaults to OUT/checkpoints; `resume_from`
    starts from that checkpoint (its step, optimizer and sampler state) instead of the newest one.
    """

    def __init__(
        self,
        run: RunConfig,
        out_dir: str | Path,
        *,
        batches: BatchSource,
        eval_data: EvalData | None = None,
        tokenizer=None,
        resume: bool = False,
        console=None,
        on_step: Callable[["Trainer", dict], None] | None = None,
        dims: ParallelDims | None = None,
        param_precision: str = "fp32",
        checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
    ) -> None:
        self.run = run
        self.cfg = run.train
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.out_dir / "checkpoints"
        from .stages import mix_retrieval, prepare_model

        self.batches = mix_retrieval(batches, run.train, tokenizer)
        self.eval_data = eval_data
        self.tokenizer = tokenizer
        self.on_step = on_step
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console
        cfg = self.cfg
        if cfg.seq_len > run.model.max_position_embeddings:
            raise ConfigError(
                f"train.seq_len ({cfg.seq_len}) exceeds model.max_position_embeddings "
                f"({run.model.max_position_embeddings}); lower seq_len or raise max_position_embeddings"
            )
        if tokenizer is not None and tokenizer.vocab_size > run.model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {run.model.vocab_size}; "
                f"set model.vocab_size={tokenizer.vocab_size} or use a smaller tokenizer"
            )
        if dims is not None and cfg.optimizer != "adamw":
            raise ConfigError(f"train.optimizer={cfg.optimizer!r} is not supported with --parallel/--nproc "
                              "(Muon needs whole matrices); use --set train.optimizer=adamw")

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # deterministic mode also fills every new tensor with NaN, a full write of each
            # activation; the step never reads memory it has not written, so that costs without
            # guarding anything
            torch.utils.deterministic.fill_uninitialized_memory = False
        self.device = resolve_device(cfg.device, setting="train.device") if dims is None else dims.device
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        # On a layout each rank builds the model on the meta device and `parallelize` allocates and
        # fills only its shard: the one-process initial values, or a stage's initial weights read
        # box by box from --init-from (each rank reads only what it holds).
        resuming = resume or resume_from is not None
        model = build_model(run.model, device="meta" if dims is not None else self.device, seed=cfg.seed)
        model.train()
        # a long-context stage: the initial run's weights (a new run, not a resume), frozen parts
        prepare_model(model, cfg, initialise=not resuming and dims is None)
        if dims is None:
            self.engine: StepEngine = LocalEngine(model, self.device, self.autocast_dtype)
        else:
            from ..interop.safetensors_io import CheckpointError
            from ..parallel.engine import parallelize

            load_from = cfg.init_from if cfg.init_from and not resuming else None
            try:
                self.engine = parallelize(model, dims, seq_len=cfg.seq_len, precision=param_precision,
                                          autocast_dtype=self.autocast_dtype, seed=cfg.seed, load_from=load_from)
            except CheckpointError as exc:
                raise ConfigError(f"train.init_from {cfg.init_from} does not fit this model ({exc}); "
                                  "a stage keeps the architecture of the run it starts from") from None
        self.model = self.engine.module
        self.is_main = self.engine.rank == 0
        self.weights = LossWeights.from_train(cfg)
        self.with_mtp = self.weights.with_mtp(run.model)
        self.optimizers = build_optimizers(self.model, cfg)
        self.schedule = WSDSchedule(cfg)
        self.params = count_parameters(run.model)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0  # wall seconds of this run, across resumes (drives a time-based schedule)
        self.train_time = 0.0  # seconds inside training steps only (tokens/s, MFU)
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.resumed_from: Path | None = None
        self._saved_step: int | None = None
        self._throughput: list[tuple[int, float, float]] = []  # (tokens, seconds, flops/token) per finite step

        if resume or resume_from is not None:
            self._resume(resume_from)
        elif ckpt.newest_complete(self.checkpoint_dir) is not None:
            raise ConfigError(
                f"{self.out_dir} already holds checkpoints of a run; pass --resume to continue it, "
                "or choose another --out"
            )
        self.metrics = None
        if self.is_main:
            self.metrics = MetricsLog(self.out_dir, resume_step=self.step if self.resumed_from else None,
                                      tensorboard=cfg.tensorboard)

        # MFU's denominator is the peak of every device the run uses
        world = self.engine.world_size
        if cfg.peak_tflops > 0:
            self.peak_flops, self.peak_source = world * cfg.peak_tflops * 1e12, "--peak-tflops (user-given)"
            if world > 1:
                self.peak_source += f" x {world} ranks"
        else:
            peak, self.peak_source = measure_peak_flops(self.device, self.autocast_dtype or torch.float32)
            self.peak_flops = self.engine.reduce_scalar(peak, "sum")
            if world > 1:
                self.peak_source += f", summed over {world} ranks"

    # -----------------------------------------------------------------------------------------------
    def _resume(self, path: str | Path | None) -> None:
        found = Path(path) if path is not None else ckpt.newest_complete(self.checkpoint_dir)
        if found is None:
            raise ConfigError(
                f"--resume: no complete checkpoint in {self.checkpoint_dir}; start without --resume"
            )
        config_file = found / "train_config.json"
        saved = from_dict(json.loads(config_file.read_text())["model"], source=str(config_file))
        diffs = config_differences(self.run.model, saved)
        if diffs:
            raise ConfigError(
                f"--resume: the checkpoint {found} has a different architecture ({'; '.join(diffs)}); "
                "use the same --preset/--config/--set model.* as the original run, or another --out"
            )
        ts = self.engine.load_checkpoint(found, self.optimizers)
        self.step = ts["step"]
        self.tokens_seen = ts["tokens_seen"]
        self.elapsed = ts["elapsed"]
        self.train_time = ts["train_time"]
        self.skipped_total = ts["skipped_total"]
        self.consecutive_skips = ts["consecutive_skips"]
        self.batches.load_state_dict(ts["sampler"])
        self.resumed_from = found
        self._saved_step = self.step
        self.say(f"resumed from {found} (step {self.step}, saved on {ts.get('layout', 'an unrecorded layout')})")

    def say(self, text: str) -> None:
        if self.is_main:
            self.console.print(text, highlight=False, markup=False)

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _done(self) -> bool:
        if self.cfg.time_budget > 0:
            # every rank must stop at the same step: a time budget follows rank 0's clock
            self.elapsed = self.engine.broadcast_scalar(self.elapsed)
        return self.schedule.done(self.step, self.elapsed)

    # -----------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches. Returns its metrics record."""
        cfg, engine = self.cfg, self.engine
        t0 = time.perf_counter()
        lr_scale = self.schedule.scale(self.step, self.elapsed)
        self.optimizers.set_lr_scale(lr_scale)
        self.optimizers.zero_grad()
        engine.set_lsa_mode("dense" if self.step < cfg.lsa_dense_warmup_steps else "sparse")

        parts: dict[str, float] = {}
        counts = None
        tokens = 0
        for _ in range(cfg.grad_accum):
            inputs, labels = self.batches.next_batch()
            result = engine.forward_backward(torch.as_tensor(inputs), torch.as_tensor(labels), self.weights,
                                             scale=1.0 / cfg.grad_accum)
            for k, v in result.losses.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
            counts = result.counts if counts is None else counts + result.counts
            tokens += result.tokens

        grad_norm = engine.clip_grad_norm_(cfg.grad_clip)
        finite = engine.all_finite(parts["loss_total"], grad_norm)
        if finite:
            self.optimizers.step()
            if cfg.router_bias_rate > 0:
                update_router_bias(self.model, counts, cfg.router_bias_rate, cfg.router_bias_update)
            self.consecutive_skips = 0
        else:
            self.optimizers.zero_grad()
            self.skipped_total += 1
            self.consecutive_skips += 1
        self.step += 1
        self.tokens_seen += tokens
        synchronize(self.device)
        dt = time.perf_counter() - t0
        self.train_time += dt

        # active parameters from the step's global routing counts, the same on 1 and N ranks
        L, N = counts.shape[0], self.run.model.n_routed_experts
        ffn_slots = float(counts[:, :N].sum()) / (tokens * L)
        active = self.params.base_active_params + ffn_slots * self.params.expert_slot_params_per_layer * L
        tokens_per_s = tokens / dt
        model_flops = flops_per_token(self.run.model, cfg.seq_len, active, self.with_mtp)
        if finite:
            self._throughput.append((tokens, dt, model_flops))
        record = {
            "kind": "train",
            "step": self.step,
            "loss": parts["lm"],
            **{k: v for k, v in parts.items() if k != "lm"},
            "lr": cfg.lr * lr_scale,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * model_flops / self.peak_flops,
            "mfu_peak_flops": self.peak_flops,
            "mfu_peak_source": self.peak_source,
            "model_flops_per_token": model_flops,
            "mem_peak_gib": engine.reduce_scalar(peak_memory_gib(self.device), "max"),
            "tokens_seen": self.tokens_seen,
            "zero_expert_share": float(counts[:, N:].sum() / counts.sum()),
            "ffn_slots_per_token": ffn_slots,
            "active_params": active,
            "skipped": not finite,
            "elapsed_s": self.elapsed + dt,
            "world_size": engine.world_size,
            "layout": engine.layout_name,
        }
        if not finite and self.consecutive_skips >= cfg.max_skipped_steps:
            self._write(record)
            raise TrainingError(
                f"stopped at step {self.step}: {self.consecutive_skips} consecutive steps with a non-finite "
                f"loss or gradient (loss {parts['loss_total']}, grad norm {grad_norm}); lower train.lr, "
                f"raise train.warmup_steps, or raise train.max_skipped_steps to tolerate more"
            )
        return record

    # -----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float] | None:
        """Mean held-out loss (nats/token) over every held-out token, and bits per byte.

        On N ranks a batch whose rows do not split evenly is padded with masked rows by the
        engine, so every rank count evaluates the same tokens (collective: every rank calls it)."""
        if self.eval_data is None:
            return None
        nats, count = 0.0, 0
        for inputs, labels in self.eval_data.batches():
            n, c = self.engine.heldout_nats(torch.as_tensor(inputs), torch.as_tensor(labels))
            nats += n
            count += c
        if count == 0:
            return None
        loss = nats / count
        # bpb = nats/token * tokens/byte / ln 2, with the held-out split's token/byte ratio
        return {"eval_loss": loss, "bpb": loss * self.eval_data.tokens_per_byte / math.log(2), "eval_tokens": count}

    def sample(self) -> str | None:
        # a sharded model has no whole copy to sample from
        if self.tokenizer is None or self.cfg.sample_tokens <= 0 or not isinstance(self.engine, LocalEngine):
            return None
        return sample_text(
            self.model, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens,
            temperature=self.cfg.sample_temperature, seed=self.cfg.seed, context_len=self.cfg.seq_len,
            autocast_dtype=self.autocast_dtype,
        )

    def save(self, root: str | Path | None = None) -> Path:
        """Checkpoint the current step under `root` (default: the run's checkpoint directory)."""
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "train_time": self.train_time,
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "sampler": self.batches.state_dict(),
            "layout": self.engine.layout_name,
            "world_size": self.engine.world_size,
        }
        extra = {"train_config.json": self.run.to_json()}
        if self.tokenizer is not None:
            extra["tokenizer.json"] = self.tokenizer.to_json()
        target = Path(root) if root is not None else self.checkpoint_dir
        try:
            path = self.engine.save_checkpoint(target, self.step, self.optimizers, trainer_state,
                                               extra_files=extra, keep=self.cfg.keep_checkpoints)
        except ckpt.CheckpointSaveError as exc:
            raise TrainingError(str(exc)) from exc
        if root is None:
            self._saved_step = self.step
        return path

    # -----------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(step=self.step, tokens_seen=self.tokens_seen, stopped="steps",
                             mfu_peak_flops=self.peak_flops, mfu_peak_source=self.peak_source,
                             metrics=self.metrics.path if self.metrics is not None else None)
        progress = _Progress(self, enabled=cfg.progress and self.is_main and self.console.is_terminal)
        last_eval: dict | None = None
        telemetry = Telemetry(self.device, interval_s=1.0)  # rss_gib, cpu_percent, device_mem_gib per record
        try:
            with progress, telemetry:
                while not self._done():
                    t0 = time.perf_counter()
                    record = self.train_step()
                    record.update(telemetry.record_fields())
                    result.losses.append(record["loss"])
                    self._write(record)
                    if self.on_step is not None:
                        self.on_step(self, record)
                    self.elapsed += time.perf_counter() - t0
                    finishing = self._done()

                    if (cfg.eval_every and self.step % cfg.eval_every == 0) or finishing:
                        te = time.perf_counter()
                        last_eval = self.evaluate()
                        if last_eval is not None:
                            self._write({"kind": "eval", "step": self.step, **last_eval})
                            progress.note(f"step {self.step}: held-out loss {last_eval['eval_loss']:.4f}, "
                                          f"{last_eval['bpb']:.4f} bits/byte")
                        self.elapsed += time.perf_counter() - te
                    if (cfg.sample_every and self.step % cfg.sample_every == 0) or finishing:
                        te = time.perf_counter()
                        text = self.sample()
                        if text is not None:
                            self._write({"kind": "sample", "step": self.step, "text": text})
                            result.sample = text
                            if not finishing:
                                progress.note(f"step {self.step} sample: {text!r}")
                        self.elapsed += time.perf_counter() - te
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or finishing:
                        te = time.perf_counter()
                        result.checkpoint = self.save()
                        self.elapsed += time.perf_counter() - te
                    progress.update(record)
                    if not finishing and cfg.log_every and self.step % cfg.log_every == 0:
                        progress.log_line(record)
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if self._saved_step != self.step or result.checkpoint is None:
            # nothing ran (already at the end) or the loop ended on a resumed step: point at the newest
            result.checkpoint = ckpt.newest_complete(self.checkpoint_dir)
        result.step = self.step
        result.tokens_seen = self.tokens_seen
        result.stopped = "steps" if self.step >= cfg.steps else "time_budget"
        result.train_seconds = self.train_time
        result.skipped_steps = self.skipped_total
        if last_eval is not None:
            result.eval_loss, result.bpb = last_eval["eval_loss"], last_eval["bpb"]
        if self._throughput:
            # steady state: total tokens over total step time, without the first 10% of the steps
            # (allocator warm-up, first-touch page faults)
            steady = self._throughput[min(len(self._throughput) - 1, max(1, len(self._throughput) // 10)):]
            seconds = sum(s for _, s, _ in steady)
            result.tokens_per_s = sum(t for t, _, _ in steady) / seconds
            result.mfu = sum(t * f for t, _, f in steady) / seconds / self.peak_flops
        if self.metrics is not None:
            png = self.out_dir / "loss_curve.png"
            result.plot_note = plot_loss_curve(self.metrics.path, png)
            result.plot = None if result.plot_note else png
        else:
            result.plot_note = "written by rank 0"
        return result


class _Progress:
    """A live rich progress bar (loss, tokens/s, ETA) or, without a terminal, periodic log lines."""

    def __init__(self, trainer: Trainer, enabled: bool) -> None:
        self.trainer = trainer
        self.enabled = enabled
        self.console = trainer.console
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("step {task.fields[step]}"), TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._progress.__enter__()
            t = self.trainer
            self._task = self._progress.add_task(
                "train", total=1000, completed=1000 * t.schedule.progress(t.step, t.elapsed),
                step=t.step, loss="-", tps="-",
            )
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def update(self, record: dict) -> None:
        if self._progress is None:
            return
        t = self.trainer
        loss = record["loss"]
        self._progress.update(
            self._task, completed=1000 * t.schedule.progress(t.step, t.elapsed), step=t.step,
            loss=f"{loss:.3f}" if loss is not None and math.isfinite(loss) else "nan",
            tps=f"{record['tokens_per_s']:,.0f}",
        )

    def note(self, text: str) -> None:
        self.trainer.say(text)

    def log_line(self, record: dict) -> None:
        if self._progress is not None or not self.trainer.is_main:
            return
        t = self.trainer
        loss = record["loss"]
        done = f"{100 * t.schedule.progress(t.step, t.elapsed):.0f}%"
        self.console.print(
            f"step {t.step} ({done})  loss {loss:.4f}  lr {record['lr']:.2e}  "
            f"grad {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s  mfu {record['mfu']:.1%}",
            highlight=False, markup=False,
        )


__all__ = [
    "BatchSource", "EvalData", "Trainer", "TrainResult", "TrainingError", "resolve_precision",
]
