"""Set up the world, parallelize a model, and run one distributed training step.

`ParallelModel` is the N-rank step engine of `longcat.train.Trainer` (the interface is
`longcat.train.engine.StepEngine`): the Trainer owns the loop, this file what depends on the
layout. What a Trainer with `dims=` does, in order (docs/PARALLEL.md has more):

    dims = setup(layout, config, seq_len=T, global_batch=B, ...)   # validate, init, mesh
    model = build_model(config, device="meta")                       # nothing allocated yet
    pm = parallelize(model, dims, seq_len=T, seed=seed)              # PP -> TP -> EP -> CP -> FSDP, then
                                                                     # each rank fills only its shard
    each step:
        result = pm.forward_backward(inputs, labels, weights)        # the GLOBAL batch, every rank
        norm = pm.clip_grad_norm_(max_norm)
        if pm.all_finite(result.loss_total, norm): optimizer.step(); update_router_bias(pm.module, result.counts, ...)
    shutdown_distributed()

Every rank passes the same global batch (B, T), or only its own rows of it (B / dp, when `setup`
was given the global batch); `forward_backward` takes this rank's rows (data parallel) and
zig-zag chunks (context parallel). Loss values and router counts come back
averaged/summed over all data ranks, so they equal a single-process run on the same batch, and
the one router-bias rule (`longcat.train.engine.update_router_bias`) sees the global counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import ModelConfig
from ..model.lm import LongCatForCausalLM, training_losses
from ..model.losses import LossWeights, StepResult
from .layout import ParallelDims, ParallelLayout, build_mesh, device_type_for, init_distributed


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(
    layout: ParallelLayout,
    config: ModelConfig,
    *,
    device: str = "auto",
    seq_len: int | None = None,
    global_batch: int | None = None,
    weights: LossWeights | None = None,
) -> ParallelDims:
    """Validate the layout against the model and the world (before any work), then init and mesh."""
    weights = weights or LossWeights()
    layout.validate(
        config, world_size_from_env(), seq_len=seq_len, global_batch=global_batch,
        with_mtp=weights.with_mtp(config), with_indexer_loss=weights.with_indexer(config),
        with_aux_losses=weights.any_aux,
    )
    device_type = device_type_for(device)
    init_distributed(device_type)
    dims = build_mesh(layout, device_type)
    dims.global_batch = global_batch
    return dims


# ------------------------------------------------------------------------------------------------


IGNORE_INDEX = -100  # label of the rows that pad a held-out batch to a whole share per rank


class ParallelModel:
    """A LongCat model parallelized over a mesh: the N-rank `longcat.train.engine.StepEngine`.

    `module` holds this rank's parameters under the full model's names: the model itself, or a
    `PipelineRankModel` with the rank's stages. Build the optimizer over `module.parameters()`.
    """

    def __init__(self, dims: ParallelDims, module: nn.Module, *, seq_len: int | None, cp_kv=None,
                 stages=None, schedule=None, autocast_dtype: torch.dtype | None = None) -> None:
        self.dims = dims
        self.layout = dims.layout
        self.module = module
        self.config: ModelConfig = module.config
        self.seq_len = seq_len
        self.cp_kv = cp_kv
        self.stages = stages or []
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype
        self.device = dims.device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.layout_name = str(dims.layout)
        self._loss_scale = 1.0
        self._loss_sum = False  # pipeline_loss: summed cross-entropy of a held-out batch

    # --- data ---------------------------------------------------------------------------------
    def rows_are_local(self, rows: int) -> bool:
        """Whether a training micro-batch of `rows` sequences is already this rank's share of the
        global batch (`global_batch / dp` rows, e.g. from a sampler that reads only this data
        rank's windows) rather than the whole global batch."""
        dp, global_batch = self.layout.dp, self.dims.global_batch
        return dp > 1 and global_batch is not None and rows * dp == global_batch

    def shard_batch(self, inputs: torch.Tensor, labels: torch.Tensor, *, local: bool = False):
        """(B, T) -> this rank's rows (data parallel) and zig-zag chunks (context parallel).

        The batch is the global one, whose rows are split over the data ranks, or with `local`
        already this data rank's rows."""
        B = inputs.shape[0]
        dp, dp_rank = self.layout.dp, self.dims.dp_rank
        if local:
            x, y = inputs, labels
        else:
            if B % dp:
                raise ValueError(f"global batch {B} is not divisible by dp_replicate*dp_shard = {dp}")
            rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
            x, y = inputs[rows], labels[rows]
        positions = None
        if self.cp_kv is not None:
            positions = self.cp_kv.positions(self.dims.local_rank("cp")).to(x.device)
            index = positions[0]
            x, y = x[:, index], y[:, index]
        device = self.dims.device
        return x.to(device), y.to(device), None if positions is None else positions.to(device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dims.device.type, dtype=self.autocast_dtype)

    def _all_reduce(self, t: torch.Tensor, mesh_name: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.dims.size(mesh_name) > 1:
            dist.all_reduce(t, op=op, group=self.dims.group(mesh_name))
        return t

    # --- forward and backward -----------------------------------------------------------------
    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, weights: LossWeights | None = None,
                         *, scale: float = 1.0) -> StepResult:
        """Forward and backward of one micro-batch, the global one or this data rank's rows of it
        (`rows_are_local`); gradients accumulate (times `scale`, e.g. 1/grad_accum). Losses are
        global means; counts are global sums; `tokens` counts the global batch."""
        weights = weights or LossWeights()
        local = self.rows_are_local(inputs.shape[0])
        if self.schedule is not None:
            return self._pipeline_forward_backward(inputs, labels, scale, local)
        x, y, positions = self.shard_batch(inputs, labels, local=local)
        with_mtp = weights.with_mtp(self.config)
        with_indexer = weights.with_indexer(self.config)
        with self._autocast():
            out = self.module(x, positions=positions, cache=self.cp_kv, mtp=with_mtp, indexer_loss=with_indexer,
                              labels=y)
        counts = self._all_reduce(out.router.counts.clone(), "dp_cp")
        losses = training_losses(
            out, y, mtp_weight=weights.mtp, z_loss=weights.z_loss, balance=weights.balance,
            indexer=weights.indexer if with_indexer else 0.0,
            # the model's own balance loss, with f from the GLOBAL counts and P this rank's mean router
            # probability: averaged over data ranks (as gradients are) it is the one-process loss
            balance_loss=lambda: dataclasses.replace(out.router, counts=counts).balance_loss(),
        )
        total = losses["loss_total"]
        (total * scale).backward()
        names = list(losses)
        values = torch.stack([losses[k].detach().float() for k in names])
        values = self._all_reduce(values, "dp_cp") / self.dims.size("dp_cp")
        return StepResult(dict(zip(names, values.tolist())), counts, inputs.numel() * (self.layout.dp if local else 1))

    def _pipeline_forward_backward(self, inputs, labels, scale: float, local: bool) -> StepResult:
        x, y, _ = self.shard_batch(inputs, labels, local=local)
        for stage in self.stages:
            stage.router_counts = []
        has_first = any(s.first for s in self.stages)
        has_last = any(s.last for s in self.stages)
        losses: list[torch.Tensor] = []
        self._loss_scale = scale
        args = (x,) if has_first else ()
        kwargs = {"target": y, "losses": losses} if has_last else {}
        with self._autocast():
            self.schedule.step(*args, **kwargs)
        # the schedule's losses carry the gradient scale; report the plain mean
        loss = torch.stack(losses).mean().detach().float() / scale if has_last else torch.zeros((), device=x.device)
        loss = self._all_reduce(loss.reshape(1), "pp")
        loss = self._all_reduce(loss, "dp_cp") / self.dims.size("dp_cp")
        L, E = self.config.num_layers, self.config.num_experts_total
        counts = torch.zeros(L, E, dtype=torch.long, device=x.device)
        for stage in self.stages:
            for i, c in stage.step_router_counts(self.layout.microbatches).items():
                counts[i] += c.to(counts.device)
        counts = self._all_reduce(self._all_reduce(counts, "pp"), "dp_cp")
        value = float(loss[0])
        return StepResult({"lm": value, "loss_total": value}, counts, inputs.numel() * (self.layout.dp if local else 1))

    @torch.no_grad()
    def heldout_nats(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """Summed next-token cross-entropy of a global held-out batch and its token count, without
        gradients (collective: every rank calls it).

        A batch whose rows do not split over the data ranks (and, pipelined, the micro-batches) is
        padded with copies of its first row whose labels are masked (IGNORE_INDEX): every rank
        gets a whole share, and the padding adds neither loss nor tokens."""
        count = int((labels != IGNORE_INDEX).sum())
        per_step = self.layout.dp * (self.layout.microbatches if self.schedule is not None else 1)
        pad = -inputs.shape[0] % per_step
        if pad:
            inputs = torch.cat([inputs, inputs[:1].expand(pad, -1)])
            labels = torch.cat([labels, labels.new_full((pad, labels.shape[1]), IGNORE_INDEX)])
        x, y, positions = self.shard_batch(inputs, labels)
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            has_first = any(s.first for s in self.stages)
            has_last = any(s.last for s in self.stages)
            self._loss_sum = True
            try:
                with self._autocast():
                    self.schedule.eval(*((x,) if has_first else ()),
                                       **({"target": y, "losses": losses} if has_last else {}))
            finally:
                self._loss_sum = False
            for stage in self.stages:
                stage.router_counts = []
            nats = torch.stack(losses).sum().float() if has_last else torch.zeros((), device=x.device)
            nats = self._all_reduce(nats.reshape(1), "pp")
        else:
            was_training = self.module.training
            self.module.eval()
            try:
                with self._autocast():
                    out = self.module(x, positions=positions, cache=self.cp_kv, mtp=False, indexer_loss=False)
            finally:
                self.module.train(was_training)
            nats = _summed_cross_entropy(out.logits, y).reshape(1)
        return float(self._all_reduce(nats, "dp_cp")[0]), count

    def pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from .pipeline import next_token_loss

        if self._loss_sum:
            return _summed_cross_entropy(logits, labels)
        return next_token_loss(logits, labels) * self._loss_scale

    # --- after backward -----------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global gradient norm over every parameter shard (FSDP, TP, EP, PP); clips if max_norm > 0."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        by_mesh: dict[object, list[torch.Tensor]] = {}
        for p in params:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(key, []).append(p.grad)
        total_sq = torch.zeros((), dtype=torch.float32, device=self.dims.device)
        for mesh, grads in by_mesh.items():
            norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=False)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            total_sq = total_sq + norm.float() ** 2
        total_sq = self._all_reduce(total_sq.reshape(1), "pp")
        total = float(total_sq.sqrt())
        if max_norm > 0 and math.isfinite(total) and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for p in params:
                p.grad.mul_(coef)
        return total

    def all_finite(self, *values: float) -> bool:
        """True on every rank, or False on every rank: a non-finite value anywhere is seen everywhere."""
        bad = torch.tensor([0.0 if all(math.isfinite(v) for v in values) else 1.0], device=self.dims.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() == 0.0)

    # --- agreement between ranks ---------------------------------------------------------------
    def reduce_scalar(self, value: float, op: str) -> float:
        """`op` ("sum" or "max") of a number over every rank."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return float(t[0])

    def broadcast_scalar(self, value: float) -> float:
        """Rank 0's value on every rank."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t[0])

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, root: Path, step: int, optimizers, trainer_state: dict, *,
                        extra_files: dict[str, str], keep: int) -> Path:
        """A DCP checkpoint root/step_N (collective); `optimizers` is `longcat.train.optim.Optimizers`."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(root, step, self.module, _only_optimizer(optimizers), trainer_state, keep=keep,
                               extra_files=extra_files)

    def load_checkpoint(self, path: Path, optimizers) -> dict:
        """Fill module and optimizer from a DCP checkpoint saved on any layout (collective)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, self.module, _only_optimizer(optimizers))

    def set_lsa_mode(self, mode: str) -> None:
        for target in [self.module, *self.stages]:
            if hasattr(target, "lsa_mode"):
                target.lsa_mode = mode

    def train(self, mode: bool = True) -> "ParallelModel":
        self.module.train(mode)
        for stage in self.stages:
            stage.train(mode)
        return self


def _summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _only_optimizer(optimizers) -> torch.optim.Optimizer:
    # sharded layouts train with AdamW alone (the Trainer refuses Muon there)
    (optimizer,) = optimizers.optimizers.values()
    return optimizer


# ------------------------------------------------------------------------------------------------


def parallelize(
    model: LongCatForCausalLM,
    dims: ParallelDims,
    *,
    seq_len: int | None = None,
    precision: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    load_from: str | os.PathLike | None = None,
) -> ParallelModel:
    """Apply the layout to a model, in TorchTitan's order: pipeline split, tensor parallel,
    expert parallel, context parallel, then FSDP.

    A model built on the meta device (`build_model(config, device="meta")`) is laid out first and
    then only this rank's shard of each parameter is allocated and initialised, with the values a
    one-process `build_model(config, seed=seed)` has (`sharded_init.materialize_shards`), or with
    `load_from` (any checkpoint `longcat.load` reads) read from disk box by box
    (`sharded_load.load_shards`: each rank reads only what it holds). A model with real weights
    (the same on every rank, e.g. loaded) is sharded as it is and `seed` unused.

    `precision` sets FSDP's MixedPrecisionPolicy ("auto": bf16 params with fp32 reduction on
    accelerators, fp32 on CPU); `autocast_dtype` wraps the forward in torch.autocast.
    """
    from .context import apply_context_parallel
    from .expert import apply_expert_parallel
    from .fsdp import apply_fsdp, mixed_precision_policy
    from .sharded_init import is_meta_model, materialize_shards
    from .tensor import apply_tensor_parallel

    layout = dims.layout
    on_meta = is_meta_model(model)
    if load_from is not None and not on_meta:
        raise ValueError("parallelize(load_from=...) fills a model built on the meta device; build it with "
                         "build_model(config, device='meta')")
    if layout.cp > 1 and seq_len is None:
        raise ValueError("context parallelism needs seq_len")
    stages, schedule = [], None
    if layout.pp > 1:
        from .pipeline import PipelineRankModel, build_schedule, split_model

        stages, indices = split_model(model, dims.local_rank("pp"), layout.pp, layout.pp_stages_per_rank)
        parts: list[nn.Module] = list(stages)
    else:
        parts = [model]
    cp_kv = None
    for part in parts:
        if layout.tp > 1:
            apply_tensor_parallel(part, dims["tp"])
        if layout.ep > 1:
            apply_expert_parallel(part, dims["ep"])
        if layout.cp > 1:
            cp_kv = apply_context_parallel(part, dims["cp"], seq_len)
        if layout.fsdp:
            policy = mixed_precision_policy(precision, dims.device.type)
            # Under PP every micro-batch would re-gather: keep the parameters between them.
            apply_fsdp(part, dims, policy, reshard_after_forward=layout.pp == 1)
    if on_meta and load_from is not None:
        from .sharded_load import load_shards

        load_shards(parts, load_from, device=dims.device)
    elif on_meta:
        materialize_shards(parts, dims.device, seed, model.config)
    if layout.pp > 1:
        pm = ParallelModel(dims, PipelineRankModel(model, stages), seq_len=seq_len, stages=stages,
                           autocast_dtype=autocast_dtype)
        pm.schedule = build_schedule(stages, indices, layout.num_stages, dims["pp"], dims.device,
                                     layout.pp_schedule, layout.microbatches, pm.pipeline_loss)
        return pm
    return ParallelModel(dims, model, seq_len=seq_len, cp_kv=cp_kv, autocast_dtype=autocast_dtype)


__all__ = [
    "LossWeights", "StepResult", "ParallelModel", "setup", "parallelize", "world_size_from_env", "IGNORE_INDEX",
]
