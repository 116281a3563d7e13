"""Optimizers and the learning-rate schedule.

- AdamW for everything (decoupled weight decay on matrices only, none on norms and other 1-D).
- Muon (`torch.optim.Muon`) for the 2-D hidden matrices, as LongCat-2.0 did, with AdamW for the
  embedding tables, the output head and every 1-D parameter. The stacked experts (N, out, in) are
  N hidden matrices too: `ExpertMuon` applies the same update to each expert slice with a batched
  Newton-Schulz iteration. Muon runs with `adjust_lr_fn="match_rms_adamw"` (Moonlight), so one
  peak LR drives both optimizers.
- Warmup-stable-decay: linear warmup over `warmup_steps`, constant, then a linear decay to
  `min_lr_ratio * lr` over the last `decay_fraction` of the run. "The run" is measured as
  progress in [0, 1] = max(step / steps, elapsed / time_budget): with a time budget the decay
  starts when (1 - decay_fraction) of the budget is used, so a run cut by time still ends with a
  decayed LR. Elapsed time is saved in checkpoints, so a resumed run continues the same clock.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


# ---------------------------------------------------------------------------------------------------
# Muon for stacked experts


def batched_newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Orthogonalise each matrix of g (E, m, n): the quintic iteration of torch.optim.Muon, batched."""
    a, b, c = coefficients
    x = g.bfloat16()
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.transpose(-2, -1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1 per matrix
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)  # (E, m, m)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.transpose(-2, -1) if transposed else x


class ExpertMuon(torch.optim.Optimizer):
    """Muon over stacked expert weights (E, m, n): each (m, n) slice is one matrix.

    Same update and state layout ("momentum_buffer") as torch.optim.Muon with Nesterov momentum.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315), eps: float = 1e-7,
                 ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_coefficients=ns_coefficients,
                        eps=eps, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 3:
                    raise ValueError(f"ExpertMuon takes stacked (E, m, n) weights, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom)
                update = batched_newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                # match_rms_adamw: 0.2 * sqrt(max(m, n)), as torch.optim.Muon
                adjusted = lr * 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-adjusted)
        return None


# ---------------------------------------------------------------------------------------------------
# parameter groups


def _is_embedding_or_head(name: str) -> bool:
    return name.startswith(("embed_tokens.", "lm_head.", "ngram.tables."))


def param_groups(model: nn.Module, use_muon: bool) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split parameters: 'muon' (2-D hidden), 'muon_experts' (3-D stacked), 'decay', 'no_decay'."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "muon_experts": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            groups["no_decay"].append((name, p))
        elif use_muon and not _is_embedding_or_head(name):
            groups["muon" if p.ndim == 2 else "muon_experts"].append((name, p))
        else:
            groups["decay"].append((name, p))
    return groups


class Optimizers:
    """One or more torch optimizers stepped together, with one LR multiplier for all groups."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for opt in optimizers.values():
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]

    def set_lr_scale(self, scale: float) -> None:
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run uses {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> Optimizers:
    use_muon = cfg.optimizer == "muon"
    groups = param_groups(model, use_muon)
    adam_groups = [
        {"params": [p for _, p in groups["decay"]], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0},
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    # foreach=False: the single-tensor path is what we checked for bit-exact resume
    optimizers: dict[str, torch.optim.Optimizer] = {
        "adamw": torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    }
    if use_muon:
        if groups["muon"]:
            optimizers["muon"] = torch.optim.Muon(
                [p for _, p in groups["muon"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw",
            )
        if groups["muon_experts"]:
            optimizers["muon_experts"] = ExpertMuon(
                [p for _, p in groups["muon_experts"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
            )
    return Optimizers(optimizers)


# ---------------------------------------------------------------------------------------------------
# schedule


class WSDSchedule:
    """Warmup-stable-decay LR multiplier, driven by step count and (optionally) elapsed time."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.warmup_steps = cfg.warmup_steps
        self.total_steps = cfg.steps
        self.time_budget = cfg.time_budget
        self.decay_fraction = cfg.decay_fraction
        self.min_ratio = cfg.min_lr_ratio

    def progress(self, step: int, elapsed: float) -> float:
        """Share of the run done before optimizer step `step` (0-based) at `elapsed` seconds."""
        p = step / self.total_steps
        if self.time_budget > 0:
            p = max(p, elapsed / self.time_budget)
        return min(1.0, p)

    def scale(self, step: int, elapsed: float = 0.0) -> float:
        """LR multiplier for optimizer step `step` (0-based)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        p = self.progress(step, elapsed)
        start = 1.0 - self.decay_fraction
        if p <= start or self.decay_fraction == 0:
            decay = 1.0
        else:
            decay = 1.0 - (1.0 - self.min_ratio) * (p - start) / self.decay_fraction
        return warm * decay

    def done(self, step: int, elapsed: float) -> bool:
        return step >= self.total_steps or (self.time_budget > 0 and elapsed >= self.time_budget)


__all__ = ["ExpertMuon", "Optimizers", "WSDSchedule", "batched_newton_schulz", "build_optimizers", "param_groups"]
