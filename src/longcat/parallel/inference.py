"""Inference on several processes: each rank holds only its shard of the weights.

Layout (`--parallel tp=T,ep=E`, on max(T, E) ranks; the smaller degree divides the larger):

- attention (every MLA, MTP heads included): q_b_proj and kv_b_proj split by heads (rows), o_proj by
  its input columns; each rank attends with its n_heads/T heads over the whole latent cache (the
  cache holds one [c_kv, k_rope] per token, not per head, so it is the same on every rank) and a
  hook on the MLA sums the partial outputs over the tp group;
- dense FFNs: gate/up split by rows, down by columns, the partial outputs summed the same way;
- experts: each rank of an ep group holds N/E consecutive experts. The hidden states are the same on
  every rank, so every rank computes the same routing, runs only its own experts on the tokens
  routed to them, and one all-reduce over the ep group sums the MoE output (vLLM's all-reduce MoE:
  no all-to-all, no data-dependent communication). Tokens routed to zero-computation (identity)
  experts need no communication of their own: weight * x is added into the partial sum of the
  first rank of the ep group only, so the one all-reduce counts it once;
- everything else (embeddings, n-gram tables, norms, the latent projections, the LSA indexer, the
  router, the output head) is replicated.

Every collective runs on every rank in the same order, because every rank computes the same
tokens; greedy decoding is therefore the same on every rank, and sampling too when every rank
uses the same seed (`shared_seed`).

`shard_for_inference` works on a model built on the meta device (each parameter becomes its local
shard, still on meta, marked with `mark_shard` so a loader fills its box) or on real weights (each
parameter is cut to its box). `load_for_inference` builds on meta, shards, and fills the shards.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, ModelConfig
from ..model import LongCatForCausalLM
from ..model.attention import MLA
from ..model.fp8 import BLOCK, SCALE_SUFFIX, is_fp8
from ..model.layers import SwiGLU
from ..model.moe import DispatchState, LocalDispatcher, MoE
from .layout import ParallelLayout, init_distributed
from .sharded_init import mark_shard, shard_box


@dataclass
class InferenceRanks:
    """This process's place in an inference layout and the groups it reduces over."""

    layout: ParallelLayout
    rank: int
    world_size: int
    tp_rank: int
    ep_rank: int
    tp_group: object | None  # None when tp = 1 (nothing to reduce)
    ep_group: object | None  # None when ep = 1

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def ep(self) -> int:
        return self.layout.ep


def inference_ranks(layout: ParallelLayout) -> InferenceRanks:
    """The tp and ep groups of this rank (the default process group must be initialised). Ranks
    are grouped in consecutive blocks: tp group r // tp, ep group r // ep. Every rank makes every
    group, in the same order, as torch.distributed requires."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {}
    for name, degree in (("tp", layout.tp), ("ep", layout.ep)):
        mine = None
        if degree > 1:
            for start in range(0, world, degree):
                group = dist.new_group(list(range(start, start + degree)))
                if start <= rank < start + degree:
                    mine = group
        groups[name] = mine
    return InferenceRanks(layout, rank, world, rank % layout.tp, rank % layout.ep, groups["tp"], groups["ep"])


def shared_seed(seed: int | None = None) -> int:
    """`seed`, or one drawn on rank 0, the same on every rank: sampled decoding must draw the same
    numbers everywhere, or the ranks choose different tokens and their collectives stop matching."""
    if seed is not None:
        return seed
    value = torch.tensor([random.SystemRandom().randrange(2**62)], dtype=torch.long)
    dist.broadcast(value, src=0)
    return int(value.item())


# ---------------------------------------------------------------------------------------------------
# sharding


def _all_reduce_(out: torch.Tensor, group) -> None:
    """Sum `out` over `group` in place; 16-bit partials are summed in fp32 (one rounding, not one
    per rank)."""
    if out.dtype in (torch.bfloat16, torch.float16):
        wide = out.float()
        dist.all_reduce(wide, group=group)
        out.copy_(wide)
    else:
        dist.all_reduce(out, group=group)


def _sum_output_over(group):
    """A forward hook that sums the module's output (or the first element of a tuple) over `group`."""

    def hook(_module, _inputs, output):
        _all_reduce_(output[0] if isinstance(output, tuple) else output, group)
        return output

    return hook


class ExpertSliceDispatcher(LocalDispatcher):
    """The MoE dispatcher of one rank of an ep group holding experts [first, first + count).

    dispatch: the (token, slot) pairs routed to this rank's experts, grouped by local expert.
    combine: this rank's weighted expert outputs (plus the identity experts' weight * x on the
    group's first rank only), summed over the ep group -> the MoE output (T, H) on every rank.
    """

    def __init__(self, first: int, count: int, adds_identity: bool, group) -> None:
        self.first, self.count, self.adds_identity, self.group = first, count, adds_identity, group

    def dispatch(self, x: torch.Tensor, routing, num_experts: int):
        """x (T, H) -> rows (M, H) for this rank's experts grouped by local expert, counts (count,)."""
        k = routing.indices.shape[1]
        local = routing.indices.reshape(-1) - self.first  # (T*k,) index among this rank's experts
        mine = ((local >= 0) & (local < self.count)).nonzero().squeeze(1)
        experts = local[mine]
        slots = mine[torch.argsort(experts, stable=True)]
        counts = torch.bincount(experts, minlength=self.count)
        token_index = slots // k
        state = DispatchState(token_index, routing.weights.reshape(-1)[slots], routing.indices.shape[0])
        return x[token_index], counts, state

    def combine(self, rows: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
        """out (T, H) holds the identity experts' part: kept on one rank, so the sum counts it once."""
        base = out if self.adds_identity else torch.zeros_like(out)
        summed = super().combine(rows, state, base)
        _all_reduce_(summed, self.group)
        return summed


def _cut(module: nn.Module, name: str, dim: int, start: int, length: int, block_dim: int | None = None) -> None:
    """Replace module.<name> (a parameter) by its box [start, start + length) along `dim`, and its
    FP8 block scales (buffer <name>_scale_inv, when FP8-resident) by the blocks of that box."""
    full = getattr(module, name)
    _replace(module, name, full, dim, start, length, parameter=True)
    scale_name = name + SCALE_SUFFIX
    if is_fp8(full) and hasattr(module, scale_name):
        scale = getattr(module, scale_name)
        if block_dim is None:  # split along a leading (expert) dim: the scales split the same way
            _replace(module, scale_name, scale, dim, start, length, parameter=False)
        else:  # split along a blocked dim: whole blocks (validate_inference checked the alignment)
            if start % BLOCK or length % BLOCK:
                raise ConfigError(f"a tensor-parallel split of {name} at {start}+{length} cuts its {BLOCK}x{BLOCK} "
                                  "FP8 blocks; lower tp, or load without --weights-dtype fp8")
            _replace(module, scale_name, scale, dim, start // BLOCK, length // BLOCK, parameter=False)


def _replace(module: nn.Module, name: str, full: torch.Tensor, dim: int, start: int, length: int, *,
             parameter: bool) -> None:
    shape, offset, _ = shard_box(full)
    local_shape = list(full.shape)
    local_shape[dim] = length
    if full.is_meta:
        local = torch.empty(local_shape, dtype=full.dtype, device="meta")
    else:
        local = full.detach().narrow(dim, start, length).clone()
    box = list(offset)
    box[dim] += start
    if parameter:
        setattr(module, name, nn.Parameter(local, requires_grad=False))
        mark_shard(getattr(module, name), shape, tuple(box))
    else:
        module.register_buffer(name, mark_shard(local, shape, tuple(box)))


def _shard_attention(attn: MLA, ranks: InferenceRanks) -> None:
    heads = attn.n_heads // ranks.tp
    first = ranks.tp_rank * heads
    qk = attn.nope + attn.rope
    _cut(attn.q_b_proj, "weight", 0, first * qk, heads * qk, block_dim=0)
    _cut(attn.kv_b_proj, "weight", 0, first * (attn.nope + attn.v_dim), heads * (attn.nope + attn.v_dim), block_dim=0)
    _cut(attn.o_proj, "weight", 1, first * attn.v_dim, heads * attn.v_dim, block_dim=1)
    attn.n_heads = heads  # its views use the local head count; the latent cache is per token
    attn.register_forward_hook(_sum_output_over(ranks.tp_group))


def _shard_ffn(ffn: SwiGLU, ranks: InferenceRanks) -> None:
    width = ffn.gate_proj.weight.shape[0] // ranks.tp
    first = ranks.tp_rank * width
    _cut(ffn.gate_proj, "weight", 0, first, width, block_dim=0)
    _cut(ffn.up_proj, "weight", 0, first, width, block_dim=0)
    _cut(ffn.down_proj, "weight", 1, first, width, block_dim=1)
    ffn.register_forward_hook(_sum_output_over(ranks.tp_group))


def _shard_experts(moe: MoE, ranks: InferenceRanks) -> None:
    count = moe.num_experts // ranks.ep
    first = ranks.ep_rank * count
    _cut(moe.experts, "gate_up_proj", 0, first, count)
    _cut(moe.experts, "down_proj", 0, first, count)
    moe.experts.num_experts = count
    moe.dispatcher = ExpertSliceDispatcher(first, count, ranks.ep_rank == 0, ranks.ep_group)


def shard_for_inference(model: LongCatForCausalLM, ranks: InferenceRanks) -> LongCatForCausalLM:
    """Cut `model` (on the meta device, or with real weights) to this rank's shards, in place, and
    add the reductions; see the module docstring. Returns the model."""
    if getattr(model, "inference_ranks", None) is not None:
        raise ValueError("this model is already sharded for inference")
    if ranks.tp > 1:
        for module in model.modules():
            if isinstance(module, MLA):
                _shard_attention(module, ranks)
            elif isinstance(module, SwiGLU):
                _shard_ffn(module, ranks)
    if ranks.ep > 1:
        for module in model.modules():
            if isinstance(module, MoE):
                _shard_experts(module, ranks)
    model.inference_ranks = ranks
    return model


# ---------------------------------------------------------------------------------------------------
# building and loading


def setup_inference(layout: ParallelLayout | str | None, config: ModelConfig, *, device_type: str = "cpu",
                    weights_dtype: str | None = None) -> InferenceRanks:
    """Initialise torch.distributed (torchrun's environment), check the layout against the world
    and the model, and make the groups. Raises ConfigError before any weight is allocated."""
    if not isinstance(layout, ParallelLayout):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        layout = ParallelLayout.parse(layout or f"tp={world},ep={world}")
    init_distributed(device_type)
    layout.validate_inference(config, dist.get_world_size(), fp8_block=BLOCK if weights_dtype == "fp8" else None)
    return inference_ranks(layout)


def load_for_inference(path, ranks: InferenceRanks, *, device="cpu", dtype: torch.dtype | None = None,
                       weights_dtype: str | None = None) -> LongCatForCausalLM:
    """The model at `path` (anything `longcat.load` reads) holding this rank's shards only, with the
    values `longcat.load(path, dtype=..., weights_dtype=...)` gives them in one process, ready for
    `longcat.infer.Engine` (eager decoding). The model is built on the meta device and cut before
    anything is allocated; each rank reads only its boxes of the checkpoint (`load_shards`)."""
    from .sharded_load import load_config, load_shards, prepare_meta_model

    config = load_config(path)
    if dtype is None and weights_dtype in (None, "fp8"):
        dtype = stored_dtype(path)  # as `longcat.load`: weights as stored, FP8 ones dequantized to it
    with torch.device("meta"):
        model = LongCatForCausalLM(config)
    prepare_meta_model(model, dtype=dtype, weights_dtype=weights_dtype)
    shard_for_inference(model, ranks)
    load_shards([model], path, device=device, dtype=dtype, weights_dtype=weights_dtype)
    return model.eval()


def stored_dtype(path) -> torch.dtype:
    """The dtype a checkpoint stores its word embedding in (what `longcat.load` keeps by default and
    dequantizes FP8 weights to); bf16 when it is FP8 or not a float."""
    from ..interop.runs import DCP_CHECKPOINT, HF_MODEL, resolve
    from ..interop.safetensors_io import SafetensorsDir

    found = resolve(path)
    if found.kind == HF_MODEL:
        from ..interop.hf import open_published

        opened = open_published(found.weights)
        try:
            plan = opened.plans.get("embed_tokens.weight")
            stored = plan.stored_dtype() if plan is not None else torch.bfloat16
        finally:
            opened.source.close()
    elif found.kind == DCP_CHECKPOINT:
        import torch.distributed.checkpoint as dcp

        from ..interop.dcp import MODEL_PREFIX

        meta = dcp.FileSystemReader(str(found.weights)).read_metadata().state_dict_metadata
        stored = meta[MODEL_PREFIX + "embed_tokens.weight"].properties.dtype
    else:
        source = SafetensorsDir(found.weights)
        try:
            stored = source.info["embed_tokens.weight"].dtype
        finally:
            source.close()
    return stored if stored.is_floating_point and not is_fp8(stored) else torch.bfloat16


def local_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


__all__ = ["InferenceRanks", "ExpertSliceDispatcher", "inference_ranks", "shared_seed", "shard_for_inference",
           "setup_inference", "load_for_inference", "stored_dtype", "local_bytes"]
