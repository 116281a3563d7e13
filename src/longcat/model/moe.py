"""Mixture of experts with zero-computation (identity) experts.

route -> dispatch (permute tokens by expert) -> grouped-GEMM experts -> combine. The dispatcher is
the one seam expert parallelism replaces (all_to_all_single instead of a local permute); the
layer code never changes. Tokens routed to identity experts never enter the dispatcher: their
contribution, weight * x, is computed where the token lives.

Inference with few tokens (decode steps) skips the dispatcher: every (token, slot) pair reads its
own expert's weights by index, with static shapes, so the same code runs eagerly and under
torch.compile (where the weight reads fuse into the product loops and nothing is copied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .fp8 import dense_weight, is_fp8
from .layers import linear, realized


@dataclass
class Routing:
    """Router decisions for T tokens (flattened batch)."""

    logits: torch.Tensor  # (T, N+Z) fp32
    probs: torch.Tensor  # (T, N+Z) fp32 softmax over all entries
    indices: torch.Tensor  # (T, k) chosen entries; >= N means identity expert
    weights: torch.Tensor  # (T, k) unbiased probabilities * routed_scaling_factor (fp32)


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.moe_topk
        self.scaling = config.routed_scaling_factor
        self.classifier = nn.Linear(config.hidden_size, config.num_experts_total, bias=False)
        # Aux-loss-free balancing: selection uses probs + bias; the trainer moves the bias.
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts_total))

    def forward(self, x: torch.Tensor) -> Routing:
        """x (T, H) -> Routing. Logits in fp32 whatever the autocast state."""
        with torch.autocast(x.device.type, enabled=False):
            logits = linear(x.float(), self.classifier.weight.float())
        probs = logits.softmax(dim=-1)
        with torch.no_grad():
            indices = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        weights = probs.gather(1, indices) * self.scaling
        return Routing(logits, probs, indices, weights)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.contiguous()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # grouped_mm is not covered by autocast: cast by hand to the autocast dtype.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# Largest dequantized copy of FP8-resident expert weights the grouped path makes at once.
DEQUANTIZED_EXPERT_BYTES = 256 << 20


class GroupedExperts(nn.Module):
    """N SwiGLU experts stored stacked: gate_up_proj (N, 2F, H), down_proj (N, H, F).

    Tokens arrive sorted by expert with `counts` per expert; all experts run as two grouped GEMMs.
    """

    def __init__(self, num_experts: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.inner = inner
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, H) sorted by expert, counts (N,) -> (M, H)."""
        if x.shape[0] == 0:
            return x.new_zeros(x.shape)
        if is_fp8(self.gate_up_proj):
            return self._forward_fp8(x, counts)
        return self._grouped(x, counts, slice(None))

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor, experts: slice) -> torch.Tensor:
        """The two grouped GEMMs for the rows x of `experts` (counts per expert of that range)."""
        dtype = compute_dtype(x)
        index = None if experts == slice(None) else torch.arange(experts.start, experts.stop, device=x.device)
        gate_up = self.weights("gate_up_proj", dtype, index).transpose(-2, -1)  # (N, H, 2F)
        down = self.weights("down_proj", dtype, index).transpose(-2, -1)  # (N, F, H)
        x = x.to(dtype)
        placed = None
        if x.device.type == "cpu" and dtype in BUCKETED_DTYPES and x.shape[0] >= gate_up.shape[0]:
            x, counts, placed = bucket_rows(x, counts)
        offsets = counts.cumsum(0).to(torch.int32)
        h = grouped_mm(x, gate_up, offsets, counts)
        gate, up = h.split(self.inner, dim=-1)
        h = (F.silu(gate) * up).contiguous()
        out = grouped_mm(h, down, offsets, counts)
        return out if placed is None else out.index_select(0, placed)

    def _forward_fp8(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """FP8-resident experts, a range of experts at a time: each range is dequantized for its
        grouped GEMMs and freed, so the dequantized copy never exceeds DEQUANTIZED_EXPERT_BYTES
        (all of a LongCat-Flash layer's experts would be 25 GB in bf16)."""
        per_expert = 3 * self.inner * self.gate_up_proj.shape[-1] * compute_dtype(x).itemsize
        step = max(1, DEQUANTIZED_EXPERT_BYTES // per_expert)
        ends = counts.cumsum(0).tolist()
        out = []
        for first in range(0, self.num_experts, step):
            last = min(first + step, self.num_experts)
            begin, end = (ends[first - 1] if first else 0), ends[last - 1]
            if end > begin:
                out.append(self._grouped(x[begin:end], counts[first:last], slice(first, last)))
        return torch.cat(out)

    def weights(self, name: str, dtype: torch.dtype, index: torch.Tensor | None = None) -> torch.Tensor:
        """gate_up_proj or down_proj in `dtype` (of the experts in `index` only, when given),
        dequantized when FP8-resident (gate and up each on their own block grid)."""
        return dense_weight(self, name, dtype, parts=2 if name == "gate_up_proj" else 1, index=index)


# Dtypes whose CPU GEMMs oneDNN runs with a kernel built per shape (fp32 goes to BLAS, which has none).
BUCKETED_DTYPES = (torch.bfloat16, torch.float16)


def bucketed_count(rows: int) -> int:
    """`rows` rounded up to a multiple of an eighth of its power of two (at least 16): at most 8
    distinct sizes per octave, at most 1/8 extra rows."""
    if rows == 0:
        return 0
    grain = max(16, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // grain) * grain


def bucket_rows(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) grouped by expert -> (x padded with zero rows to bucketed group sizes (M', K),
    bucketed counts (N,), placed (M,): where each row of x now sits).

    On CPU every bf16/fp16 GEMM of a new (rows, K, N) shape makes oneDNN build a kernel (its
    primitive cache holds 1024): with exact group sizes, which change with every batch's routing,
    each expert's GEMMs in forward and backward build new kernels at every step, and that costs
    more than the products. Bucketed, the sizes repeat and the kernels are reused. Zero rows add
    nothing to any product or weight gradient, and their outputs are dropped.
    """
    exact = counts.tolist()
    padded = [bucketed_count(c) for c in exact]
    shift = torch.tensor([p_start - e_start for p_start, e_start in zip(_starts(padded), _starts(exact))],
                         device=x.device)
    placed = torch.arange(x.shape[0], device=x.device) + shift.repeat_interleave(counts, output_size=x.shape[0])
    out = _PlaceRows.apply(x, placed, sum(padded))
    return out, torch.tensor(padded, dtype=counts.dtype, device=counts.device), placed


class _PlaceRows(torch.autograd.Function):
    """x (M, K) -> (rows, K) zeros with x's rows at `placed`. Unlike `index_copy`, whose backward
    keeps its source, this keeps only the index: the padded rows are saved by the GEMM already."""

    @staticmethod
    def forward(ctx, x, placed, rows):  # noqa: D102
        ctx.save_for_backward(placed)
        return x.new_zeros(rows, x.shape[1]).index_copy_(0, placed, x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (placed,) = ctx.saved_tensors
        return grad.index_select(0, placed), None, None


def _starts(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts


# Devices where torch._grouped_mm is known to work; elsewhere (e.g. Ascend NPU) loop over experts.
_GROUPED_MM_DEVICES = {"cpu", "cuda"}


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows of x grouped by expert (offsets = cumulative counts) @ w[e] (E, K, N) -> (M, N)."""
    few_rows = x.shape[0] < w.shape[0]  # decode: grouped_mm pays per group, used or not
    if not few_rows and hasattr(torch, "_grouped_mm") and x.device.type in _GROUPED_MM_DEVICES:
        return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offsets))
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(chunks) if chunk.shape[0]])


@dataclass
class DispatchState:
    token_index: torch.Tensor  # (M,) source token of each dispatched row
    weights: torch.Tensor  # (M,) gate weight of each row
    num_tokens: int


class LocalDispatcher:
    """Permute (token, slot) pairs routed to FFN experts into expert order, and back.

    Expert parallelism swaps this for a dispatcher that exchanges the rows with all_to_all_single;
    the interface (dispatch -> rows sorted by local expert + counts; combine -> (T, H)) is the same.
    """

    def dispatch(self, x: torch.Tensor, routing: Routing, num_experts: int):
        """x (T, H) -> rows (M, H) grouped by expert, counts (N,), state for combine."""
        T, k = routing.indices.shape
        flat = routing.indices.reshape(-1)
        ffn = (flat < num_experts).nonzero().squeeze(1)  # slots that go to real experts
        experts = flat[ffn]
        order = torch.argsort(experts, stable=True)
        slots = ffn[order]
        counts = torch.bincount(experts, minlength=num_experts)
        token_index = slots // k
        state = DispatchState(token_index, routing.weights.reshape(-1)[slots], T)
        return x[token_index], counts, state

    def combine(self, rows: torch.Tensor, state: DispatchState, out: torch.Tensor) -> torch.Tensor:
        """Scatter-add weighted expert outputs (M, H) into out (T, H)."""
        weighted = rows * state.weights.unsqueeze(1).to(rows.dtype)
        return out.index_add(0, state.token_index, weighted.to(out.dtype))


@dataclass
class MoEStats:
    """What the trainer logs and the bias update needs, for one MoE block."""

    counts: torch.Tensor  # (N+Z,) slots per entry in this forward (no grad)
    mean_probs: torch.Tensor  # (N+Z,) mean router probability (with grad; balance loss)
    num_tokens: int


# Tokens up to which a compiled inference forward (no autograd) runs only the chosen experts, pair by
# pair with static shapes, instead of sorting the pairs by expert for the grouped GEMM (which on CPU
# also pays for every one of the N experts, used or not).
GATHER_TOKENS = 64


def entry_counts(indices: torch.Tensor, entries: int) -> torch.Tensor:
    """Slots per router entry (entries,): bincount with a static size (traceable by torch.compile)."""
    flat = indices.reshape(-1)
    return torch.zeros(entries, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.router = Router(config)
        self.experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.expert_ffn_hidden_size)
        self.dispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, H)
        routing = self.router(x)
        # identity experts: weight * x, computed locally, never dispatched
        identity = routing.indices >= self.num_experts
        identity_weight = (routing.weights * identity).sum(-1, keepdim=True)  # (T, 1)
        out = x * identity_weight.to(x.dtype)
        T, k = routing.indices.shape
        # eager, the pairs' weights are gathered into a copy: worth it while that reads no more than
        # the grouped GEMM's pass over every expert; compiled, the gather fuses into the product loops
        few = T <= GATHER_TOKENS if torch.compiler.is_compiling() else T * k <= self.num_experts
        if few and not torch.is_grad_enabled() and type(self.dispatcher) is LocalDispatcher:
            out = out + self.chosen_experts(x, routing)
        else:
            rows, counts, state = self.dispatcher.dispatch(x, routing, self.num_experts)
            rows = self.experts(rows, counts)
            out = self.dispatcher.combine(rows, state, out)
        stats = MoEStats(
            counts=entry_counts(routing.indices, routing.probs.shape[1]).detach(),
            mean_probs=routing.probs.mean(0),
            num_tokens=x.shape[0],
        )
        return out.reshape(shape), stats

    def chosen_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The FFN experts' weighted sum for each token, x (T, H) -> (T, H), pair by pair: pair
        (t, j) runs token t through expert indices[t, j]. Static shapes, no sort, no scatter.

        An identity slot borrows an FFN expert its token already uses, with gate 0: compiled, its
        weight rows are already in cache, so the slot costs no memory traffic.
        """
        T, H = x.shape
        k, N = routing.indices.shape[1], self.num_experts
        is_ffn = routing.indices < N
        borrowed = routing.indices.gather(1, is_ffn.int().argmax(1, keepdim=True))
        # realized: one load per pair in the weight loops, not the chain of ops that computes it
        expert = realized(torch.where(is_ffn, routing.indices, borrowed).clamp(max=N - 1).flatten())  # (P,) P = T*k
        dtype = compute_dtype(x)
        gate = (routing.weights * is_ffn).flatten().to(dtype)  # (P,)
        xs = x.to(dtype).unsqueeze(1).expand(T, k, H).reshape(T * k, 1, H)  # (P, 1, H)
        gate_up = linear(xs, self.experts.weights("gate_up_proj", dtype, expert))  # (P, 1, 2F)
        g, u = gate_up.split(self.experts.inner, dim=-1)
        y = linear(F.silu(g) * u, self.experts.weights("down_proj", dtype, expert)) * gate.view(-1, 1, 1)  # (P, 1, H)
        # realized per pair, then summed over a reshape: fused into the per-token sum instead, every
        # output element would walk all k experts' rows (and a scatter here was read before it had
        # finished when inductor fused it with its readers, torch 2.13)
        return realized(y).view(T, k, H).sum(1).to(x.dtype)
