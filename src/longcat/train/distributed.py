"""`longcat train` on several processes: the Trainer's recipe on a `longcat.parallel` layout.

`longcat train --nproc N --parallel LAYOUT` validates the layout, then re-runs itself under
torchrun (`longcat.parallel.run_under_torchrun`); every worker (or every process of a
`torchrun ... -m longcat.train ...` launch on many nodes) runs `train_distributed`.

Same semantics as the single-process Trainer: every rank builds the same global batch of
`micro_batch` sequences per micro-batch from the same seed (the engine takes its rows), the same
loss recipe, WSD schedule, clipping, skip-on-non-finite and router-bias update; AdamW only.
Rank 0 alone writes metrics.jsonl. Checkpoints are DCP directories OUT/checkpoints/step_N
(`longcat.parallel.save_checkpoint`: shards, train_state.json, then the COMPLETE marker; a crash
mid-save leaves no marker and the directory is ignored); rank 0 then adds train_config.json and
tokenizer.json next to it (so `--resume` finds the run config and tokenizer). Text samples are
skipped (the model is sharded).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..config import ConfigError
from .config import RunConfig
from .trainer import TrainingError, TrainResult, resolve_precision


def loss_weights(run: RunConfig):
    from ..parallel.engine import LossWeights

    cfg = run.train
    return LossWeights(mtp=cfg.mtp_weight, z_loss=cfg.z_loss, balance=cfg.balance_loss,
                       indexer=cfg.indexer_loss_weight)


def check_parallel_run(run: RunConfig, layout_text: str | None, world_size: int):
    """Everything a worker would reject, rejected before any process starts. Returns the layout."""
    from ..parallel.layout import ParallelLayout

    cfg = run.train
    if cfg.optimizer != "adamw":
        raise ConfigError(f"train.optimizer={cfg.optimizer!r} is not supported with --parallel/--nproc "
                          "(Muon needs whole matrices); use --set train.optimizer=adamw")
    layout = ParallelLayout.parse(layout_text or f"dp_shard={world_size}")
    w = loss_weights(run)
    layout.validate(run.model, world_size, seq_len=cfg.seq_len, global_batch=cfg.micro_batch,
                    with_mtp=w.mtp > 0 and run.model.mtp_num_layers > 0,
                    with_indexer_loss=w.indexer > 0 and run.model.lsa_enabled, with_aux_losses=w.any_aux)
    return layout


def train_distributed(run: RunConfig, out_dir: Path, *, layout_text: str | None, resume: bool, console) -> TrainResult:
    """Call on every rank under torchrun."""
    import torch.distributed as dist

    from ..data import PackedBatches, eval_batches
    from ..model import build_model
    from ..parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from ..parallel.engine import build_adamw, parallelize, setup, world_size_from_env
    from ..parallel.layout import ParallelLayout
    from . import checkpoint as ckpt
    from .metrics import MetricsLog, expected_active_params, flops_per_token, measure_peak_flops, plot_loss_curve
    from .optim import WSDSchedule
    from .run import prepare_data, with_tokenizer_ids

    cfg = run.train
    out_dir = Path(out_dir)
    layout = check_parallel_run(run, layout_text, world_size_from_env())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    weights = loss_weights(run)
    dims = setup(layout, run.model, device=cfg.device, seq_len=cfg.seq_len, global_batch=cfg.micro_batch,
                 weights=weights)
    rank = dist.get_rank()
    say = (lambda text: console.print(text, highlight=False, markup=False)) if rank == 0 else (lambda text: None)
    checkpoint_dir = out_dir / "checkpoints"
    if not resume and ckpt.newest_complete(checkpoint_dir) is not None:
        raise ConfigError(f"{out_dir} already holds checkpoints of a run; pass --resume to continue it, "
                          "or choose another --out")
    # rank 0 trains/saves the tokenizer and fills the token cache first; the others then read them
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
    if data.tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{run.model.vocab_size}; set model.vocab_size={data.tokenizer.vocab_size}")

    device = dims.device
    autocast_dtype = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = build_model(run.model, device=device, seed=cfg.seed)
    model.train()
    pm = parallelize(model, dims, seq_len=cfg.seq_len, precision="fp32", autocast_dtype=autocast_dtype)
    optimizer = build_adamw(pm.module, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    schedule = WSDSchedule(cfg)
    batches = PackedBatches(data.store.train, cfg.seq_len, cfg.micro_batch, seed=cfg.seed)
    heldout = data.store.heldout

    step, tokens_seen, elapsed, train_time, skipped_total, consecutive = 0, 0, 0.0, 0.0, 0, 0
    if resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise ConfigError(f"--resume: no complete distributed checkpoint in {checkpoint_dir}")
        ts = load_checkpoint(found, pm.module, optimizer)
        step, tokens_seen, elapsed = ts["step"], ts["tokens_seen"], ts["elapsed"]
        train_time, skipped_total, consecutive = ts["train_time"], ts["skipped_total"], ts["consecutive_skips"]
        batches.load_state_dict(ts["sampler"])
        say(f"resumed from {found} (step {step}, saved on layout {ts.get('layout', '?')})")
    metrics = MetricsLog(out_dir, resume_step=step if resume else None, tensorboard=cfg.tensorboard) if rank == 0 else None
    if cfg.peak_tflops > 0:
        peak, peak_source = cfg.peak_tflops * 1e12, "--peak-tflops (user-given)"
    else:
        peak, peak_source = measure_peak_flops(device, autocast_dtype or torch.float32)
    with_mtp = weights.mtp > 0 and run.model.mtp_num_layers > 0
    active = expected_active_params(run.model)
    say(f"layout {layout} on {dims.mesh.size()} ranks; global batch {cfg.micro_batch}x{cfg.seq_len} per "
        f"micro-batch, {cfg.grad_accum} micro-batch(es) per step; text samples are skipped (sharded model)")

    def write(record):
        if metrics is not None:
            metrics.write(record)

    def evaluate():
        nats, count = 0.0, 0
        for inputs, labels in eval_batches(heldout, cfg.seq_len, cfg.micro_batch, cfg.eval_batches):
            inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
            if inputs.shape[0] % layout.dp:
                continue  # a short last batch the data ranks cannot split evenly
            nats += pm.evaluate_loss(inputs, labels) * labels.numel()
            count += labels.numel()
        if count == 0:
            return None
        loss = nats / count
        tpb = len(heldout) / max(1, data.store.heldout_bytes)
        return {"eval_loss": loss, "bpb": loss * tpb / math.log(2), "eval_tokens": count}

    def save() -> Path:
        state = {"step": step, "tokens_seen": tokens_seen, "elapsed": elapsed, "train_time": train_time,
                 "skipped_total": skipped_total, "consecutive_skips": consecutive,
                 "sampler": batches.state_dict(), "layout": str(layout)}
        path = save_checkpoint(checkpoint_dir, step, pm.module, optimizer, state, keep=cfg.keep_checkpoints)
        if rank == 0:
            (path / "train_config.json").write_text(run.to_json())
            (path / "tokenizer.json").write_text(data.tokenizer.to_json())
        dist.barrier()
        return path

    result = TrainResult(step=step, tokens_seen=tokens_seen, stopped="steps", mfu_peak_flops=peak,
                         mfu_peak_source=peak_source, metrics=metrics.path if metrics else None)
    throughput: list[tuple[int, float, float]] = []
    last_eval, saved_step = None, (step if resume else None)
    for group in optimizer.param_groups:
        group["base_lr"] = cfg.lr
    try:
        while not schedule.done(step, elapsed):
            t0 = time.perf_counter()
            lr_scale = schedule.scale(step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
            optimizer.zero_grad(set_to_none=True)
            pm.set_lsa_mode("dense" if step < cfg.lsa_dense_warmup_steps else "sparse")
            parts: dict[str, float] = {}
            counts, tokens = None, 0
            for _ in range(cfg.grad_accum):
                inputs, labels = batches.next_batch()
                r = pm.forward_backward(torch.as_tensor(inputs), torch.as_tensor(labels), weights,
                                        scale=1.0 / cfg.grad_accum)
                for k, v in r.losses.items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
                counts = r.counts if counts is None else counts + r.counts
                tokens += r.tokens
            grad_norm = pm.clip_grad_norm_(cfg.grad_clip)
            finite = pm.all_finite(parts["loss_total"], grad_norm)
            if finite:
                optimizer.step()
                pm.update_router_bias(counts, cfg.router_bias_rate, cfg.router_bias_update)
                consecutive = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                skipped_total += 1
                consecutive += 1
            step += 1
            tokens_seen += tokens
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time += dt
            N = run.model.n_routed_experts
            ffn_slots = float(counts[:, :N].sum()) / (tokens * counts.shape[0])
            model_flops = flops_per_token(run.model, cfg.seq_len, active, with_mtp)
            if finite:
                throughput.append((tokens, dt, model_flops))
            record = {
                "kind": "train", "step": step, "loss": parts["lm"], **{k: v for k, v in parts.items() if k != "lm"},
                "lr": cfg.lr * lr_scale, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
                "mfu": tokens / dt * model_flops / peak, "mfu_peak_flops": peak, "mfu_peak_source": peak_source,
                "model_flops_per_token": model_flops, "tokens_seen": tokens_seen,
                "zero_expert_share": float(counts[:, N:].sum() / counts.sum()), "ffn_slots_per_token": ffn_slots,
                "skipped": not finite, "elapsed_s": elapsed + dt, "world_size": dims.mesh.size(),
                "layout": str(layout),
            }
            result.losses.append(record["loss"])
            write(record)
            if not finite and consecutive >= cfg.max_skipped_steps:
                raise TrainingError(f"stopped at step {step}: {consecutive} consecutive steps with a non-finite "
                                    "loss or gradient; lower train.lr or raise train.max_skipped_steps")
            elapsed += time.perf_counter() - t0
            # every rank decides `finishing` the same way: a time budget uses rank 0's clock
            clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
            dist.broadcast(clock, 0)
            elapsed = float(clock[0])
            finishing = schedule.done(step, elapsed)
            if (cfg.eval_every and step % cfg.eval_every == 0) or finishing:
                te = time.perf_counter()
                last_eval = evaluate()
                if last_eval is not None:
                    write({"kind": "eval", "step": step, **last_eval})
                    say(f"step {step}: held-out loss {last_eval['eval_loss']:.4f}, {last_eval['bpb']:.4f} bits/byte")
                elapsed += time.perf_counter() - te
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or finishing:
                te = time.perf_counter()
                result.checkpoint = save()
                saved_step = step
                elapsed += time.perf_counter() - te
            if not finishing and cfg.log_every and step % cfg.log_every == 0:
                say(f"step {step}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  grad {grad_norm:.3f}  "
                    f"{record['tokens_per_s']:,.0f} tok/s")
    finally:
        if metrics is not None:
            metrics.close()
    if saved_step != step or result.checkpoint is None:
        result.checkpoint = latest_checkpoint(checkpoint_dir)
    result.step, result.tokens_seen = step, tokens_seen
    result.stopped = "steps" if step >= cfg.steps else "time_budget"
    result.train_seconds, result.skipped_steps = train_time, skipped_total
    if last_eval is not None:
        result.eval_loss, result.bpb = last_eval["eval_loss"], last_eval["bpb"]
    if throughput:
        steady = throughput[min(len(throughput) - 1, max(1, len(throughput) // 10)):]
        seconds = sum(s for _, s, _ in steady)
        result.tokens_per_s = sum(t for t, _, _ in steady) / seconds
        result.mfu = sum(t * f for t, _, f in steady) / seconds / peak
    if rank == 0:
        png = out_dir / "loss_curve.png"
        result.plot_note = plot_loss_curve(result.metrics, png)
        result.plot = None if result.plot_note else png
    else:
        result.plot_note = "written by rank 0"
    return result


__all__ = ["check_parallel_run", "train_distributed", "loss_weights"]
