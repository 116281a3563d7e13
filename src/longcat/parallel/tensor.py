"""Tensor parallelism for MLA and the dense SwiGLU FFNs (DTensor `parallelize_module` plans).

Per attention sublayer: q_b_proj and kv_b_proj column-wise (each rank computes n_heads/tp heads),
o_proj row-wise (partial outputs all-reduced). Per dense FFN: gate/up column-wise, down row-wise.
The low-rank projections (q_a_proj, kv_a_proj_with_mqa), the latent norms, the MoE and the
embeddings stay replicated: their inputs and outputs are full tensors on every tp rank.

Gradients of the replicated part: the column-wise layers all-reduce their input gradient, so
q_latent and the kv latent get full gradients. The one exception is the shared rope key: it goes
straight into attention for the local heads only, so each rank sees the gradient of its own heads.
A hook on kv_a_proj_with_mqa all-reduces exactly those rope columns in backward.

After the plan, MLA's `n_heads` is set to the local head count (its views use it), as TorchTitan
does for its attention modules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .modules import decoder_layers, mtp_layers


class _AllReduceTailGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the last `width` features of the gradient."""

    @staticmethod
    def forward(ctx, x, width: int, group):  # noqa: D102
        ctx.width, ctx.group = width, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad = grad.clone()
        tail = grad[..., -ctx.width :].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., -ctx.width :] = tail
        return grad, None, None


def _rope_key_grad_hook(attn: nn.Module, group) -> None:
    rope = attn.rope

    def hook(_module, _inputs, output):
        return _AllReduceTailGrad.apply(output, rope, group)

    attn.kv_a_proj_with_mqa.register_forward_hook(hook)


def _attention_plan(prefix: str) -> dict:
    return {
        f"{prefix}.q_b_proj": ColwiseParallel(),
        f"{prefix}.kv_b_proj": ColwiseParallel(),
        f"{prefix}.o_proj": RowwiseParallel(),
    }


def _ffn_plan(prefix: str) -> dict:
    return {
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": RowwiseParallel(),
    }


def _localize_heads(attn: nn.Module, tp: int, group) -> None:
    if attn.n_heads % tp:
        raise ValueError(f"{attn.n_heads} attention heads cannot be split over tp={tp} ranks")
    attn.n_heads //= tp
    _rope_key_grad_hook(attn, group)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Apply the TP plan to every decoder layer and MTP layer of `model` (in place)."""
    tp, group = tp_mesh.size(), tp_mesh.get_group()
    for layer in decoder_layers(model):
        plan = {}
        for j in range(len(layer.self_attn)):
            plan.update(_attention_plan(f"self_attn.{j}"))
        for j in range(len(layer.mlps)):
            plan.update(_ffn_plan(f"mlps.{j}"))
        parallelize_module(layer, tp_mesh, plan)
        for attn in layer.self_attn:
            _localize_heads(attn, tp, group)
    for head in mtp_layers(model):
        parallelize_module(head, tp_mesh, {**_attention_plan("self_attn"), **_ffn_plan("mlp")})
        _localize_heads(head.self_attn, tp, group)


__all__ = ["apply_tensor_parallel"]
