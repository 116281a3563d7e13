"""What the Trainer asks of a model, and its one-process implementation.

The Trainer (trainer.py) owns the loop: schedule, accumulation, skipped steps, metrics, eval,
checkpoint cadence and summary. Everything that depends on where the model lives sits behind the
`StepEngine` interface below:

    forward_backward(inputs, labels, weights, scale)   one GLOBAL micro-batch; losses are global
                                                       means, router counts global sums
    clip_grad_norm_(max_norm) -> float                 the global gradient norm
    all_finite(*values) -> bool                        the same answer on every rank
    heldout_nats(inputs, labels) -> (nats, tokens)     summed held-out cross-entropy of a global batch
    reduce_scalar(value, op) / broadcast_scalar(value) agree on a number (memory peak, FLOP/s, clock)
    save_checkpoint(...) / load_checkpoint(...)        the checkpoint format of this engine

`LocalEngine` is one process (single-process checkpoints: safetensors + optimizer.pt + RNG);
`longcat.parallel.ParallelModel` is N ranks on a layout (DCP checkpoints). The router-bias rule
and the loss recipe exist once: `update_router_bias` here and `longcat.model.training_losses`
(its weights and the step's result: `longcat.model.losses`, which both engines import).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..model import training_losses
from ..model.losses import LossWeights, StepResult
from . import checkpoint as ckpt


class StepEngine(Protocol):
    module: nn.Module  # this rank's parameters under the full model's names
    config: ModelConfig
    device: torch.device
    rank: int
    world_size: int
    layout_name: str

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, weights: LossWeights, *,
                         scale: float = 1.0) -> StepResult: ...
    def clip_grad_norm_(self, max_norm: float) -> float: ...
    def all_finite(self, *values: float) -> bool: ...
    def heldout_nats(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]: ...
    def set_lsa_mode(self, mode: str) -> None: ...
    def reduce_scalar(self, value: float, op: str) -> float: ...
    def broadcast_scalar(self, value: float) -> float: ...
    def save_checkpoint(self, root: Path, step: int, optimizers, trainer_state: dict, *,
                        extra_files: dict[str, str], keep: int) -> Path: ...
    def load_checkpoint(self, path: Path, optimizers) -> dict: ...


# ---------------------------------------------------------------------------------------------------
# router bias: auxiliary-loss-free balancing with the zero-expert budget


def router_target_share(config: ModelConfig) -> torch.Tensor:
    """Target share of the k slots per entry (N+Z,): K_e/(k*N) per FFN expert, (1 - K_e/k)/Z per
    identity expert, with K_e = config.ffn_slots_per_token. Sums to 1."""
    N, Z, k = config.n_routed_experts, config.zero_expert_num, config.moe_topk
    ke = config.ffn_slots_per_token
    target = torch.empty(N + Z)
    target[:N] = ke / (k * N)
    if Z:
        target[N:] = (1.0 - ke / k) / Z
    return target


@torch.no_grad()
def update_router_bias(model: nn.Module, counts: torch.Tensor, rate: float, mode: str = "sign") -> torch.Tensor:
    """bias += rate * f(target_share - observed_share), per layer; f = sign or identity.

    counts (L, N+Z): slots per entry over the step (all micro-batches; on N ranks the global sum,
    which `ParallelModel.forward_backward` all-reduces). "sign" (DeepSeek-V3) moves every bias by
    exactly `rate`, so the rate is in units of router probability; "diff" (the raw difference)
    moves far-off entries faster and needs a larger rate. `model` is the whole model or the layers
    one pipeline rank holds (keyed by their global index). Returns the (L, N+Z) deltas.
    """
    from ..parallel.modules import indexed_layers

    observed = counts.float() / counts.float().sum(-1, keepdim=True).clamp_min(1)  # (L, N+Z)
    error = router_target_share(model.config).to(observed.device) - observed
    delta = rate * (error.sign() if mode == "sign" else error)
    for i, layer in indexed_layers(model):
        bias = layer.mlp.router.e_score_correction_bias
        bias.add_(delta[i].to(bias.device, bias.dtype))
    return delta


# ---------------------------------------------------------------------------------------------------


class LocalEngine:
    """The whole model in this process."""

    rank = 0
    world_size = 1
    layout_name = "single process"

    def __init__(self, model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        self.module = model
        self.config: ModelConfig = model.config
        self.device = device
        self.autocast_dtype = autocast_dtype

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, weights: LossWeights, *,
                         scale: float = 1.0) -> StepResult:
        with_indexer = weights.with_indexer(self.config)
        inputs = inputs.to(self.device)  # (B, T) int64
        labels = labels.to(self.device)
        with self._autocast():
            out = self.module(inputs, mtp=weights.with_mtp(self.config), indexer_loss=with_indexer, labels=labels)
        losses = training_losses(out, labels, mtp_weight=weights.mtp, z_loss=weights.z_loss,
                                 balance=weights.balance, indexer=weights.indexer if with_indexer else 0.0)
        (losses["loss_total"] * scale).backward()
        return StepResult({k: float(v.detach()) for k, v in losses.items()}, out.router.counts, inputs.numel())

    def clip_grad_norm_(self, max_norm: float) -> float:
        limit = max_norm if max_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit))

    def all_finite(self, *values: float) -> bool:
        return all(math.isfinite(v) for v in values)

    @torch.no_grad()
    def heldout_nats(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        model = self.module
        model.eval()
        try:
            with self._autocast():
                out = model(inputs.to(self.device), mtp=False, indexer_loss=False)
        finally:
            model.train()
        logits = out.logits.float()
        labels = labels.to(self.device)
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 reduction="sum")
        return float(nats), labels.numel()

    def set_lsa_mode(self, mode: str) -> None:
        self.module.lsa_mode = mode

    def reduce_scalar(self, value: float, op: str) -> float:
        return value

    def broadcast_scalar(self, value: float) -> float:
        return value

    def save_checkpoint(self, root: Path, step: int, optimizers, trainer_state: dict, *,
                        extra_files: dict[str, str], keep: int) -> Path:
        return ckpt.save_checkpoint(
            root, step, model=self.module, optimizer_state=optimizers.state_dict(), trainer_state=trainer_state,
            run_config_json=extra_files["train_config.json"], tokenizer_json=extra_files.get("tokenizer.json"),
            keep=keep,
        )

    def load_checkpoint(self, path: Path, optimizers) -> dict:
        from ..interop.runs import DCP_CHECKPOINT, checkpoint_format

        if checkpoint_format(path) == DCP_CHECKPOINT:
            raise ConfigError(f"--resume: {path} was written by a multi-process run; resume it with the same "
                              "--nproc/--parallel (any layout), or start a new --out")
        state = ckpt.load_checkpoint(path)
        ckpt.load_model_state(self.module, path)
        try:
            optimizers.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise ConfigError(f"--resume: optimizer state in {path} does not fit this run ({exc}); "
                              "use the original train.optimizer") from None
        ckpt.set_rng_state(state["rng"])
        return state["trainer_state"]


__all__ = ["LocalEngine", "LossWeights", "StepEngine", "StepResult", "router_target_share", "update_router_bias"]
