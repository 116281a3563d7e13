"""What a training step is asked to compute and what it reports, shared by every step engine.

`LossWeights` are the weights `training_losses` (lm.py) applies to the auxiliary losses;
`StepResult` is what one forward/backward returns. Both live here, under the one-process
`longcat.train.LocalEngine` and the N-rank `longcat.parallel.ParallelModel`, so that neither
engine has to import the other's package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig


@dataclass
class LossWeights:
    """Weights of the auxiliary losses (0 = not computed): TrainConfig's mtp_weight, z_loss,
    balance_loss and indexer_loss_weight."""

    mtp: float = 0.0
    z_loss: float = 0.0
    balance: float = 0.0
    indexer: float = 0.0

    @property
    def any_aux(self) -> bool:
        return self.z_loss > 0 or self.balance > 0

    @classmethod
    def from_train(cls, cfg) -> "LossWeights":
        return cls(mtp=cfg.mtp_weight, z_loss=cfg.z_loss, balance=cfg.balance_loss, indexer=cfg.indexer_loss_weight)

    def with_mtp(self, config: ModelConfig) -> bool:
        return self.mtp > 0 and config.mtp_num_layers > 0

    def with_indexer(self, config: ModelConfig) -> bool:
        return self.indexer > 0 and config.lsa_enabled


@dataclass
class StepResult:
    losses: dict[str, float]  # global means over all data ranks ("lm", "mtp", ..., "loss_total")
    counts: torch.Tensor  # (L, N+Z) router slots per entry, summed over all data ranks
    tokens: int  # tokens in the global batch

    @property
    def loss_total(self) -> float:
        return self.losses["loss_total"]


__all__ = ["LossWeights", "StepResult"]
