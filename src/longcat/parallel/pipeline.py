"""Pipeline parallelism with torch.distributed.pipelining (GPipe, 1F1B, interleaved 1F1B).

The decoder layers are cut into pp * stages_per_rank equal stages. Stage 0 also holds the
embeddings, the last stage the final norm and output head. Rank r of the pp group holds stage r
(1F1B, GPipe) or stages r, r+pp, r+2pp, ... (interleaved, "looped" placement).

A `StageModule` keeps the full model's parameter names (layers live in a ModuleDict keyed by the
global layer index), so distributed checkpoints move freely between pipelined and flat layouts.
`PipelineRankModel` gathers all stages of one rank under the same names for the optimizer and
the checkpoint.

What the pipeline trains: the next-token loss. MTP heads, the LSA indexer loss, z-loss and the
balance loss are rejected by `ParallelLayout.validate` when pp > 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..model.attention import AttentionContext
from ..model.lm import LongCatForCausalLM


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    per = num_layers // num_stages
    return [range(s * per, (s + 1) * per) for s in range(num_stages)]


def stages_of_rank(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    return [pp_rank + k * pp for k in range(stages_per_rank)]


class StageModule(nn.Module):
    """One pipeline stage: [embeddings] + decoder layers [+ final norm and output head].

    forward: input ids (B, T) on the first stage, hidden states (B, T, H) elsewhere; returns hidden
    states, or logits (B, T, V) on the last stage. Each forward appends its router counts
    ({layer index: (N+Z,)}) to `router_counts`, for the router-bias update. On the first step the
    pipeline runs one extra forward to infer shapes; `step_router_counts` skips it.
    """

    def __init__(self, model: LongCatForCausalLM, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        self.embed_tokens = model.embed_tokens if first else None
        self.ngram = model.ngram if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary = model.rotary
        self.lsa_mode = "sparse"
        self.router_counts: list[dict[int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            h = self.embed_tokens(x)
            if self.ngram is not None:
                h = self.ngram(h, x)
        else:
            h = x
        T = h.shape[1]
        positions = torch.arange(T, device=h.device).unsqueeze(0)
        cos, sin = self.rotary(positions, h.dtype)
        ctx = AttentionContext(cos, sin, positions, None, sparse=self.lsa_mode == "sparse", indexer_loss=False)
        counts = {}
        for key, layer in self.layers.items():
            h, stats, _ = layer(h, ctx)
            counts[int(key)] = stats.counts
        self.router_counts.append(counts)
        if self.last:
            h = self.lm_head(self.norm(h))
        return h


    def step_router_counts(self, microbatches: int) -> dict[int, torch.Tensor]:
        """Counts summed over the step's micro-batch forwards (the last `microbatches` calls)."""
        total: dict[int, torch.Tensor] = {}
        for counts in self.router_counts[-microbatches:]:
            for i, c in counts.items():
                total[i] = total.get(i, 0) + c
        self.router_counts = []
        return total


class PipelineRankModel(nn.Module):
    """All stages one rank holds, under the full model's parameter names (optimizer, checkpoints)."""

    def __init__(self, model: LongCatForCausalLM, stages: list[StageModule]) -> None:
        super().__init__()
        self.config = model.config
        self.stages = stages  # plain list: not registered twice
        self.layers = nn.ModuleDict()
        for stage in stages:
            for key, layer in stage.layers.items():
                self.layers[key] = layer
            if stage.first:
                self.embed_tokens = stage.embed_tokens
                if stage.ngram is not None:
                    self.ngram = stage.ngram
            if stage.last:
                self.norm = stage.norm
                self.lm_head = stage.lm_head
        self.layers = nn.ModuleDict(sorted(self.layers.items(), key=lambda kv: int(kv[0])))


def split_model(model: LongCatForCausalLM, pp_rank: int, pp: int, stages_per_rank: int) -> tuple[list[StageModule], list[int]]:
    """The StageModules of this pp rank and their stage indices."""
    num_stages = pp * stages_per_rank
    ranges = stage_layer_ranges(model.config.num_layers, num_stages)
    mine = stages_of_rank(pp_rank, pp, stages_per_rank)
    stages = [StageModule(model, ranges[s], first=s == 0, last=s == num_stages - 1) for s in mine]
    return stages, mine


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1))


def build_schedule(stages: list[StageModule], stage_indices: list[int], num_stages: int, pp_mesh: DeviceMesh,
                   device: torch.device, schedule: str, microbatches: int, loss_fn=next_token_loss):
    """PipelineStage objects and the torch.distributed.pipelining schedule over them."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    group = pp_mesh.get_group()
    pipeline_stages = [PipelineStage(m, i, num_stages, device, group=group) for m, i in zip(stages, stage_indices)]
    if schedule == "interleaved":
        return ScheduleInterleaved1F1B(pipeline_stages, microbatches, loss_fn=loss_fn)
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    return cls(pipeline_stages[0], microbatches, loss_fn=loss_fn)


__all__ = [
    "StageModule", "PipelineRankModel", "split_model", "build_schedule", "next_token_loss",
    "stage_layer_ranges", "stages_of_rank",
]
