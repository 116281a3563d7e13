"""Expert parallelism: each rank of the ep group holds N/ep experts; tokens travel by all-to-all.

The model's MoE talks to its experts through a dispatcher (model/moe.py): `dispatch` returns the
rows for the experts grouped by expert with per-expert counts, `combine` scatters the expert
outputs back into (T, H). `ExpertParallelDispatcher` keeps that interface and replaces the local
permute with two `all_to_all_single` exchanges (uneven splits, autograd-capable):

    dispatch: local permute by global expert -> exchange counts -> all-to-all rows to the rank
              that owns each expert -> regroup the received rows by local expert
    combine:  undo the regroup -> all-to-all rows back -> weight and scatter-add locally

Tokens routed to zero-computation (identity) experts never enter the dispatcher: the MoE computes
weight * x where the token lives, so they never cross the network.

The expert weights become DTensors sharded on dim 0 (the expert dim) over the ep mesh, so a
distributed checkpoint sees the full (N, ...) tensors and reshards between layouts; the swapped-in
`ExpertShard` runs the grouped GEMM on the local slice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model.moe import DispatchState, GroupedExperts, LocalDispatcher, Routing, compute_dtype, grouped_mm
from .modules import decoder_layers


# The grouped GEMM returns its output through an identity autograd Function (which fixes the
# gradient's memory layout), so FSDP sees a view; every consumer in MoE is out-of-place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPExpertShard\) returned a view tensor")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, x, scale: float):  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad * ctx.scale, None


class ExpertShard(GroupedExperts):
    """GroupedExperts whose stacked weights are DTensors sharded over the ep mesh (Shard(0)).

    Same parameter names as GroupedExperts (so checkpoint keys do not change); `num_experts` is
    the number of local experts. Forward runs on the local slices.

    Gradient scale: an expert's gradient arrives already summed over the ep ranks' losses (the
    all-to-all backward brings every rank's tokens), while FSDP averages only over the ranks that
    hold the same experts. `grad_scale` = 1/ep makes the total an average over all data ranks,
    like every dense gradient. (FSDP's set_gradient_divide_factor would do it too, but it needs
    PREMUL_SUM, which gloo lacks.)
    """

    grad_scale: float = 1.0

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, H) sorted by local expert, counts (N_local,) -> (M, H)."""
        gate_up_w = _local(self.gate_up_proj)  # (N_local, 2F, H)
        down_w = _local(self.down_proj)  # (N_local, H, F)
        if self.grad_scale != 1.0:
            gate_up_w = _ScaleGrad.apply(gate_up_w, self.grad_scale)
            down_w = _ScaleGrad.apply(down_w, self.grad_scale)
        if x.shape[0] == 0:
            # No rows for this rank's experts: keep the weights in the graph so every rank runs
            # the same backward collectives (FSDP reduce-scatters their zero gradients);
            # x stays in the graph too: the all-to-all that delivered it must run backward here.
            return x * 0.0 + 0.0 * (gate_up_w.sum() + down_w.sum()).to(x.dtype)
        dtype = compute_dtype(x)
        offsets = counts.cumsum(0).to(torch.int32)
        gate_up = gate_up_w.to(dtype).transpose(-2, -1)  # (N_local, H, 2F)
        down = down_w.to(dtype).transpose(-2, -1)  # (N_local, F, H)
        h = grouped_mm(x.to(dtype), gate_up, offsets, counts)
        gate, up = h.split(self.inner, dim=-1)
        h = (torch.nn.functional.silu(gate) * up).contiguous()
        return grouped_mm(h, down, offsets, counts)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


@dataclass
class ExpertParallelState:
    local: DispatchState  # the local permute (token index and gate weight of each sent row)
    regroup: torch.Tensor  # (M_recv,) received row order -> grouped by local expert
    send_splits: list[int]  # rows sent to each ep rank
    recv_splits: list[int]  # rows received from each ep rank


class ExpertParallelDispatcher:
    """Drop-in replacement for LocalDispatcher that exchanges rows over an expert-parallel group.

    Expert e lives on ep rank e // (N / ep), as local expert e % (N / ep).
    """

    def __init__(self, ep_mesh: DeviceMesh) -> None:
        self.mesh = ep_mesh
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self._local = LocalDispatcher()

    def dispatch(self, x: torch.Tensor, routing: Routing, num_experts: int):
        """x (T, H) -> rows (M_recv, H) grouped by local expert, counts (N/ep,), state for combine."""
        rows, counts, local_state = self._local.dispatch(x, routing, num_experts)  # rows by global expert
        per_rank = num_experts // self.ep
        # counts_recv[r, e]: rows that ep rank r sends to this rank's local expert e
        counts_recv = torch.empty_like(counts)
        dist.all_to_all_single(counts_recv, counts, group=self.group)
        counts_recv = counts_recv.view(self.ep, per_rank)
        send_splits = counts.view(self.ep, per_rank).sum(1).tolist()
        recv_splits = counts_recv.sum(1).tolist()
        received = all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, self.group)
        # received rows are ordered (source rank, local expert); the grouped GEMM wants them by
        # local expert. A stable sort keeps each expert's rows in source-rank order.
        expert_of_row = torch.repeat_interleave(
            torch.arange(per_rank, device=x.device).repeat(self.ep), counts_recv.reshape(-1)
        )
        regroup = torch.argsort(expert_of_row, stable=True)
        state = ExpertParallelState(local_state, regroup, send_splits, recv_splits)
        return received[regroup], counts_recv.sum(0), state

    def combine(self, rows: torch.Tensor, state: ExpertParallelState, out: torch.Tensor) -> torch.Tensor:
        """Expert outputs (M_recv, H) grouped by local expert -> scatter-added into out (T, H)."""
        ungrouped = torch.empty_like(rows).index_copy(0, state.regroup, rows)  # back to (source rank, expert)
        returned = all_to_all_single_autograd(ungrouped, state.send_splits, state.recv_splits, self.group)
        return self._local.combine(returned, state.local, out)


def apply_expert_parallel(model: torch.nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE's experts over `ep_mesh` and swap in the all-to-all dispatcher (in place).

    Every rank must hold the same full expert weights beforehand (same seed, or loaded later from
    a distributed checkpoint); each keeps only its slice.
    """
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for layer in decoder_layers(model):
        moe = layer.mlp
        experts = moe.experts
        n = experts.num_experts
        if n % ep:
            raise ValueError(f"{n} experts cannot be split over ep={ep} ranks")
        per_rank = n // ep
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            local = full.detach()[rank * per_rank : (rank + 1) * per_rank].clone()
            shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, torch.nn.Parameter(shard, requires_grad=full.requires_grad))
        experts.__class__ = ExpertShard
        experts.num_experts = per_rank
        experts.grad_scale = 1.0 / ep
        moe.dispatcher = ExpertParallelDispatcher(ep_mesh)


__all__ = ["ExpertShard", "ExpertParallelDispatcher", "ExpertParallelState", "apply_expert_parallel"]
