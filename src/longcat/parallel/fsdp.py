"""FSDP2 (`fully_shard`) per decoder layer, per MTP layer, for the embeddings, for the output head
and at the root, with mixed precision.

Dense parameters are sharded over dp_shard x cp (HSDP: replicated over dp_replicate). With expert
parallelism the experts are already split over ep, so FSDP shards them over the remaining data
ranks (dp_shard/ep x cp) in their own group, or not at all when that group is one rank. Their
gradients arrive summed over the ep ranks by the all-to-all backward; `ExpertShard.grad_scale`
(1/ep) turns FSDP's average over the expert group into an average over all data ranks, like the
dense gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from .layout import ParallelDims
from .modules import decoder_layers, mtp_layers

PRECISIONS = ("auto", "fp32", "bf16")


def mixed_precision_policy(precision: str, device_type: str) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 gradient reduction on accelerators ("auto"), fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if precision == "fp32" or (precision == "auto" and device_type == "cpu"):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(
    module: nn.Module,
    dims: ParallelDims,
    mp_policy: MixedPrecisionPolicy,
    *,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard every decoder layer (experts in their own group under EP), MTP layer, the embeddings,
    the final norm with the output head, then the root."""
    mesh = dims.fsdp_mesh
    layout = dims.layout
    # With one rank per expert group (edp = 1, no replicas) every expert lives on exactly one rank:
    # there is nothing to shard or reduce, and an FSDP unit over one rank would only copy the
    # experts into gathered buffers at every forward. They stay plain expert-parallel DTensors.
    experts_alone = layout.ep > 1 and dims.expert_fsdp_mesh.size() == 1
    unmanaged: set[nn.Parameter] = set()
    for layer in decoder_layers(module):
        if layout.ep > 1:
            experts = layer.mlp.experts
            edp = layout.dp_shard_mod_ep * layout.cp
            placement = None
            if edp > experts.num_experts:
                # fewer local experts than shard ranks: shard the hidden dim instead
                placement = lambda _p: Shard(1)  # noqa: E731
            if experts_alone:
                unmanaged.update(experts.parameters())
            else:
                fully_shard(
                    experts, mesh=dims.expert_fsdp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward, shard_placement_fn=placement,
                )
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=unmanaged or None)
    for head in mtp_layers(module):
        fully_shard(head, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The embeddings and the output head are units of their own (as in TorchTitan), so that each
    # is gathered only around its use instead of for the whole step with the root; with a large
    # vocabulary they are the largest units. The head is needed right at the start of backward.
    embeddings = [m for m in (getattr(module, "embed_tokens", None), getattr(module, "ngram", None)) if m is not None]
    if embeddings:
        fully_shard(embeddings, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    output = [m for m in (getattr(module, "norm", None), getattr(module, "lm_head", None)) if m is not None]
    if output:
        fully_shard(output, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    fully_shard(module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False, ignored_params=unmanaged or None)


__all__ = ["apply_fsdp", "mixed_precision_policy", "PRECISIONS"]
