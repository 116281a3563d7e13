"""A small distributed training loop: the engine's pieces in order, with checkpoints and faults.

`run_training(spec)` is what `longcat parallel check` runs on every rank and what the tests use
to compare layouts; `reference_run(spec)` is the same recipe in one process with plain PyTorch
(no torch.distributed), the yardstick every layout must match on the same global batch.

Fault handling:
- resume: if `checkpoint_dir` holds a complete checkpoint, training continues from it (so a
  torchrun restart after a crashed rank picks up where the last checkpoint left off);
- `crash_at_step` kills one rank with SIGKILL on the first attempt only (fault injection);
- a non-finite loss or gradient norm on any rank skips the step on every rank (one all-reduced
  flag), and `nan_at_step` injects one on a chosen rank to test exactly that.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, preset


@dataclass
class RunSpec:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # model config fields
    layout: str = ""
    steps: int = 10
    batch: int = 4  # global sequences per step
    seq_len: int = 16
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
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    load_from: str | None = None  # start from this checkpoint (another layout's, to test resharding)
    save_final: str | None = None  # write a checkpoint of the final state here (its step dir)
    resave_after_load: str | None = None  # right after loading, save again here (checks resharding)
    crash_at_step: int = 0  # SIGKILL `crash_rank` before this step, on the first attempt only
    crash_rank: int = 0
    nan_at_step: int = 0  # make `nan_rank`'s loss NaN at this step
    nan_rank: int = 0
    results: str | None = None  # rank 0 writes a JSON summary here
    log: str | None = None  # rank 0 appends one JSON line per step here (survives restarts)
    quiet: bool = False

    def model_config(self) -> ModelConfig:
        return preset(self.preset, **self.overrides)

    def weights(self):
        from .engine import LossWeights

        return LossWeights(mtp=self.mtp_weight, z_loss=self.z_loss, balance=self.balance_loss,
                           indexer=self.indexer_loss_weight)

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


def _say(spec: RunSpec, text: str) -> None:
    if not spec.quiet:
        print(text, flush=True)


def run_training(spec: RunSpec) -> dict:
    """Train `spec.steps` steps on the layout `spec.layout` (call on every rank under torchrun)."""
    import torch.distributed as dist

    from ..model import build_model
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .engine import build_adamw, parallelize, setup
    from .layout import ParallelLayout

    torch.set_num_threads(spec.threads)
    config = spec.model_config()
    layout = ParallelLayout.parse(spec.layout)
    weights = spec.weights()
    dims = setup(layout, config, device=spec.device, seq_len=spec.seq_len, global_batch=spec.batch, weights=weights)
    rank = dist.get_rank()
    torch.manual_seed(spec.seed)
    model = build_model(config, device=dims.device, seed=spec.seed)
    model.train()
    autocast = torch.bfloat16 if spec.autocast == "bf16" else None
    pm = parallelize(model, dims, seq_len=spec.seq_len, precision=spec.precision, autocast_dtype=autocast)
    optimizer = build_adamw(pm.module, lr=spec.lr, eps=spec.adam_eps)

    start = 0
    resume_from = latest_checkpoint(spec.checkpoint_dir) if spec.checkpoint_dir else None
    source = resume_from or (Path(spec.load_from) if spec.load_from else None)
    if source is not None:
        state = load_checkpoint(source, pm.module, optimizer)
        if resume_from is not None:
            start = state["step"]
        if spec.resave_after_load:
            save_checkpoint(spec.resave_after_load, state["step"], pm.module, optimizer, {"layout": str(layout)})
        if rank == 0:
            _say(spec, f"loaded {source} (saved at step {state['step']} on layout {state.get('layout', '?')})")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    losses: dict[int, float] = {}
    norms: dict[int, float] = {}
    skipped: list[int] = []
    t0 = time.perf_counter()
    step_times = []
    for step in range(start, spec.steps):
        if spec.crash_at_step and step == spec.crash_at_step and attempt == 0 and rank == spec.crash_rank:
            _say(spec, f"[rank {rank}] fault injection: killing this rank before step {step + 1}")
            os.kill(os.getpid(), signal.SIGKILL)
        ts = time.perf_counter()
        inputs, labels = synthetic_batch(config, spec.batch, spec.seq_len, spec.seed, step)
        optimizer.zero_grad(set_to_none=True)
        result = pm.forward_backward(inputs, labels, weights)
        loss = result.loss_total
        if spec.nan_at_step and step + 1 == spec.nan_at_step and rank == spec.nan_rank:
            loss = float("nan")  # as if this rank alone had overflowed
        norm = pm.clip_grad_norm_(spec.grad_clip)
        if pm.all_finite(loss, norm):
            optimizer.step()
            pm.update_router_bias(result.counts, spec.router_bias_rate)
        else:
            skipped.append(step + 1)
        step_times.append(time.perf_counter() - ts)
        losses[step + 1] = result.losses["lm"]
        norms[step + 1] = norm
        if rank == 0:
            _say(spec, f"step {step + 1:>4}  loss {result.losses['lm']:.6f}  grad_norm {norm:.4f}"
                       + ("  (skipped: non-finite on some rank)" if step + 1 in skipped else ""))
            if spec.log:
                with open(spec.log, "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": result.losses["lm"], "grad_norm": norm,
                                        "attempt": attempt, "skipped": step + 1 in skipped}) + "\n")
        if spec.checkpoint_dir and spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0:
            save_checkpoint(spec.checkpoint_dir, step + 1, pm.module, optimizer, {"layout": str(layout)}, keep=2)
    elapsed = time.perf_counter() - t0
    # held-out loss on a batch no step trained on
    eval_loss = pm.evaluate_loss(*synthetic_batch(config, spec.batch, spec.seq_len, spec.seed, EVAL_STEP))
    final = None
    if spec.save_final:
        final = save_checkpoint(spec.save_final, spec.steps, pm.module, optimizer, {"layout": str(layout)})
    steady = step_times[1:] or step_times
    summary = {
        "layout": str(layout), "world_size": dims.mesh.size(), "start_step": start, "attempt": attempt,
        "losses": losses, "grad_norms": norms, "skipped": skipped, "eval_loss": eval_loss,
        "tokens_per_s": spec.batch * spec.seq_len / (sum(steady) / len(steady)) if steady else 0.0,
        "seconds": elapsed, "final_checkpoint": str(final) if final else None,
    }
    if rank == 0 and spec.results:
        Path(spec.results).write_text(json.dumps(summary))
    return summary


# ------------------------------------------------------------------------------------------------


def reference_run(spec: RunSpec, *, return_model: bool = False):
    """The same recipe in one process, plain PyTorch: model, AdamW, clipping, bias update."""
    from ..model import build_model, lm_losses
    from .engine import build_adamw, global_balance_loss, router_bias_delta

    torch.set_num_threads(spec.threads)
    config = spec.model_config()
    torch.manual_seed(spec.seed)
    model = build_model(config, seed=spec.seed)
    model.train()
    optimizer = build_adamw(model, lr=spec.lr, eps=spec.adam_eps)
    w = spec.weights()
    losses, norms, skipped = {}, {}, []
    for step in range(spec.steps):
        inputs, labels = synthetic_batch(config, spec.batch, spec.seq_len, spec.seed, step)
        optimizer.zero_grad(set_to_none=True)
        with_mtp = w.mtp > 0 and config.mtp_num_layers > 0
        with_indexer = w.indexer > 0 and config.lsa_enabled
        out = model(inputs, mtp=with_mtp, indexer_loss=with_indexer)
        parts = lm_losses(out, labels)
        total = parts["lm"]
        mtp = [v for k, v in parts.items() if k.startswith("mtp")]
        if with_mtp and mtp:
            total = total + w.mtp * torch.stack(mtp).mean()
        if w.z_loss > 0:
            total = total + w.z_loss * out.pre_norm_hidden.float().pow(2).mean()
        if w.balance > 0:
            total = total + w.balance * global_balance_loss(out.router.counts, out.router.mean_probs, config.n_routed_experts)
        if with_indexer and out.indexer_loss is not None:
            total = total + w.indexer * out.indexer_loss
        total.backward()
        max_norm = spec.grad_clip if spec.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        loss = float(total.detach())
        if spec.nan_at_step and step + 1 == spec.nan_at_step:
            loss = float("nan")
        if math.isfinite(loss) and math.isfinite(norm):
            optimizer.step()
            if spec.router_bias_rate > 0:
                delta = router_bias_delta(config, out.router.counts, spec.router_bias_rate, "sign")
                with torch.no_grad():
                    for i, layer in enumerate(model.layers):
                        layer.mlp.router.e_score_correction_bias.add_(delta[i])
        else:
            skipped.append(step + 1)
        losses[step + 1] = float(parts["lm"].detach())
        norms[step + 1] = norm
    model.eval()
    with torch.no_grad():
        inputs, labels = synthetic_batch(config, spec.batch, spec.seq_len, spec.seed, EVAL_STEP)
        logits = model(inputs, mtp=False, indexer_loss=False).logits
        eval_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
    model.train()
    result = {"losses": losses, "grad_norms": norms, "skipped": skipped, "eval_loss": eval_loss}
    if return_model:
        return result, model, optimizer
    return result


__all__ = ["RunSpec", "synthetic_batch", "run_training", "reference_run"]
