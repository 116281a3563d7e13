"""The LongCat causal LM: shortcut-connected MoE layers, n-gram embedding, MTP heads."""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLA, AttentionContext
from .cross_entropy import linear_cross_entropy
from .fp8 import dense_weight, is_fp8
from .layers import RMSNorm, RotaryEmbedding, SwiGLU, linear
from .moe import MoE, MoEStats
from .ngram import NgramEmbedding


class OutputHead(nn.Linear):
    """The output projection (V, H). Given `labels`, it returns the mean cross-entropy of its
    logits instead of the logits, without ever holding them (`linear_cross_entropy`). Either way it
    is called as a module, so FSDP's gather hooks see the use."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H) -> logits (..., V); with labels (...), the scalar fp32 mean loss."""
        if labels is None:
            return super().forward(x)
        weight = dense_weight(self, dtype=torch.float32) if is_fp8(self.weight) else self.weight
        return linear_cross_entropy(x, weight, labels)


class DecoderLayer(nn.Module):
    """Two attention sublayers, two dense FFNs and one MoE whose result joins at the very end.

    The delayed join is the point of the design: the MoE reads the output of the first attention
    sublayer, so its expert all-to-all can overlap FFN0, Attn1 and FFN1.
    """

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        eps = config.rms_norm_eps
        self.self_attn = nn.ModuleList([MLA(config, has_indexer=config.lsa_enabled), MLA(config)])
        self.mlps = nn.ModuleList([SwiGLU(config.hidden_size, config.ffn_hidden_size) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(config.hidden_size, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(config.hidden_size, eps) for _ in range(2)])
        self.mlp = MoE(config)

    def forward(self, h: torch.Tensor, ctx: AttentionContext):
        attn, keep, index_loss = self.self_attn[0](self.input_layernorm[0](h), ctx, 2 * self.index)
        h = h + attn
        u = self.post_attention_layernorm[0](h)
        moe_out, stats = self.mlp(u)  # joins only at the end of the layer
        h = h + self.mlps[0](u)
        attn, _, _ = self.self_attn[1](self.input_layernorm[1](h), ctx, 2 * self.index + 1, keep)
        h = h + attn
        h = h + self.mlps[1](self.post_attention_layernorm[1](h)) + moe_out
        return h, stats, index_loss


class MTPLayer(nn.Module):
    """Depth-d draft head: eh_proj([enorm(emb(x[t+d])), hnorm(h_{d-1}[t])]) -> MLA + FFN -> norm."""

    def __init__(self, config: ModelConfig, sublayer: int) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.sublayer = sublayer
        self.enorm = RMSNorm(H, eps)
        self.hnorm = RMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.mlp = SwiGLU(H, config.ffn_hidden_size)
        self.final_layernorm = RMSNorm(H, eps)

    def forward(self, emb: torch.Tensor, h: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """emb, h (B, T, H) aligned (emb of the token d steps ahead) -> (hidden, normed hidden)."""
        h = linear(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1), self.eh_proj)
        attn, _, _ = self.self_attn(self.input_layernorm(h), ctx, self.sublayer)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, self.final_layernorm(h)


@dataclass
class RouterStats:
    """Router statistics of one forward, over all MoE layers."""

    counts: torch.Tensor  # (L, N+Z) slots per entry
    mean_probs: list[torch.Tensor]  # L x (N+Z,), differentiable
    num_experts: int  # N (entries >= N are identity experts)
    num_tokens: int
    expert_slot_params: int  # parameters of one FFN expert slot in one layer
    base_active_params: int  # active parameters that do not depend on routing

    @property
    def expert_load(self) -> torch.Tensor:
        """(L, N) share of FFN-expert slots per expert (sums to 1 per layer)."""
        ffn = self.counts[:, : self.num_experts].float()
        return ffn / ffn.sum(-1, keepdim=True).clamp_min(1)

    @property
    def zero_expert_share(self) -> float:
        """Share of all k slots that went to identity experts."""
        return float(self.counts[:, self.num_experts :].sum() / self.counts.sum().clamp_min(1))

    @property
    def ffn_slots_per_token(self) -> float:
        """Average FFN-expert slots per token, per layer."""
        L = self.counts.shape[0]
        return float(self.counts[:, : self.num_experts].sum()) / max(1, self.num_tokens * L)

    @property
    def active_params_per_token(self) -> float:
        return self.base_active_params + self.ffn_slots_per_token * self.expert_slot_params * self.counts.shape[0]

    def balance_loss(self) -> torch.Tensor:
        """Switch-style balance loss over FFN experts, averaged over layers: N * sum_i f_i * P_i."""
        N = self.num_experts
        f = self.expert_load.to(self.mean_probs[0].device)
        losses = [N * (f[i] * p[:N]).sum() for i, p in enumerate(self.mean_probs)]
        return torch.stack(losses).mean()


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when the forward was given labels
    hidden_states: torch.Tensor  # (B, T, H) after the final norm
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth d: (B, T-d, V), predicts x[t+d+1]
    router: RouterStats | None = None
    indexer_loss: torch.Tensor | None = None
    pre_norm_hidden: torch.Tensor | None = None  # (B, T, H) last layer output, before the norm
    losses: dict[str, torch.Tensor] | None = None  # "lm", "mtp1", ...: forward(labels=...) computed them


class LongCatForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.ngram = NgramEmbedding(config) if config.ngram_enabled else None
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = OutputHead(H, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(config, 2 * config.num_layers + d) for d in range(config.mtp_num_layers))
        self.rotary = RotaryEmbedding(config, config.qk_rope_head_dim)
        # "sparse": LSA selects tokens; "dense": warm-up stage, attention dense, indexer still trained
        self.lsa_mode = "sparse"
        self._active = None

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, initializer_range) for matrices and tables, ones for norms, zero router bias.

        Each value is a function of the parameter's name, its index and `seed` (`init_parameter_`),
        not of how the model is laid out: a parallel layout that builds the model on the meta
        device and fills only each rank's shard gets the same weights as one process."""
        for name, p in self.named_parameters():
            if not p.is_meta:
                init_parameter_(p, name, seed, self.config.initializer_range)
        init_buffers_(self, self.config)

    def embed(self, input_ids: torch.Tensor, ngram_history: torch.Tensor | None = None) -> torch.Tensor:
        word = self.embed_tokens(input_ids)
        if self.ngram is None:
            return word
        return self.ngram(word, input_ids, ngram_history)

    def _active_counts(self) -> tuple[int, int]:
        if self._active is None:
            from .count import count_parameters

            c = count_parameters(self.config)
            self._active = (c.expert_slot_params_per_layer, c.base_active_params)
        return self._active

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache=None,
        ngram_history: torch.Tensor | None = None,
        mtp: bool | None = None,
        indexer_loss: bool | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T) -> CausalLMOutput.

        positions (B, T): absolute positions (default 0..T-1); with a `LatentCache` the keys
        written so far are attended to. `mtp` (default: training) also runs the MTP heads.
        `logits_to_keep` > 0 computes logits for the last that many positions only.
        `labels` (B, T) (the token after each position, as `lm_losses` takes them): the output
        carries the next-token and MTP losses instead of logits, computed block by block without
        the (B, T, V) logits (what training needs; `lm_losses` reads them).
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).unsqueeze(0)
        if cache is not None:
            cache.begin(positions)
        mtp = self.training if mtp is None else mtp
        indexer_loss = self.training and self.config.lsa_enabled if indexer_loss is None else indexer_loss
        emb = self.embed(input_ids, ngram_history)
        cos, sin = self.rotary(positions, emb.dtype)
        ctx = AttentionContext(cos, sin, positions, cache, sparse=self.lsa_mode == "sparse", indexer_loss=indexer_loss)

        h = emb
        stats: list[MoEStats] = []
        index_losses = []
        for layer in self.layers:
            h, s, il = layer(h, ctx)
            stats.append(s)
            if il is not None:
                index_losses.append(il)
        normed = self.norm(h)
        losses = None
        if labels is not None:
            logits, losses = None, {"lm": self.lm_head(normed, labels=labels)}
        else:
            logits = linear(normed[:, -logits_to_keep:] if logits_to_keep else normed, self.lm_head)

        mtp_logits = []
        if mtp and self.mtp:
            prev = h
            for d, head in enumerate(self.mtp, start=1):
                if T - d <= 0:
                    break
                # position t of depth d reads the embedding of x[t+d] and predicts x[t+d+1]
                sub = AttentionContext(cos[..., : T - d, :], sin[..., : T - d, :], positions[..., : T - d], cache, ctx.sparse)
                prev, normed_d = head(emb[:, d:], prev[:, : T - d], sub)
                if losses is not None:
                    losses[f"mtp{d}"] = self.lm_head(normed_d, labels=labels[:, d:])
                else:
                    mtp_logits.append(linear(normed_d, self.lm_head))

        slot, base = self._active_counts()
        router = RouterStats(
            counts=torch.stack([s.counts for s in stats]),
            mean_probs=[s.mean_probs for s in stats],
            num_experts=self.config.n_routed_experts,
            num_tokens=B * T,
            expert_slot_params=slot,
            base_active_params=base,
        )
        return CausalLMOutput(
            logits=logits,
            hidden_states=normed,
            mtp_logits=mtp_logits,
            router=router,
            indexer_loss=torch.stack(index_losses).mean() if index_losses else None,
            pre_norm_hidden=h,
            losses=losses,
        )

    # --- decoding over a latent cache: what the inference engine runs for every step, eagerly or
    # wrapped by torch.compile (the same code either way) ------------------------------------------
    def _decode_context(self, positions: torch.Tensor, dtype: torch.dtype, cache) -> AttentionContext:
        cos, sin = self.rotary(positions, dtype)
        return AttentionContext(cos, sin, positions, cache, sparse=self.lsa_mode == "sparse", indexer_loss=False)

    def decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache, ngram_history: torch.Tensor | None = None,
        *, last_only: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step: input_ids, positions (B, T) over a LatentCache whose span covers them
        (`cache.begin(positions)`, or built by `LatentCache.over`) -> (logits (B, 1 or T, V),
        pre-norm hidden (B, T, H)). The tokens' keys are written into the cache.

        `forward` with a cache computes the same; this leaves out what only training reads
        (router statistics, MTP logits) and the data-dependent cache bookkeeping.
        """
        emb = self.embed(input_ids, ngram_history)
        ctx = self._decode_context(positions, emb.dtype, cache)
        h = emb
        for layer in self.layers:
            h, _, _ = layer(h, ctx)
        normed = self.norm(h[:, -1:] if last_only else h)
        return self.head(normed), h

    def decode_mtp(
        self, depth: int, input_ids: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor, cache,
        ngram_history: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP head `depth` (1-based) over its cache sublayer: input_ids (B, T) the tokens `depth`
        ahead of positions (B, T), prev (B, T, H) the hidden state of depth-1 there -> (hidden,
        normed hidden) (B, T, H), as `forward` computes them for training; `head` gives logits."""
        emb = self.embed(input_ids, ngram_history)
        return self.mtp[depth - 1](emb, prev, self._decode_context(positions, emb.dtype, cache))

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The output head: normed hidden states (..., H) -> logits (..., V)."""
        return linear(normed, self.lm_head)


def lm_losses(output: CausalLMOutput, labels: torch.Tensor, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Next-token loss and one loss per MTP depth.

    labels (B, T): the token that follows each input position (inputs shifted by one), so MTP depth
    d at position t predicts labels[t+d]. A forward given these labels has computed them already.
    """
    if output.losses is not None:
        return dict(output.losses)
    V = output.logits.shape[-1]
    out = {"lm": F.cross_entropy(output.logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=ignore_index)}
    for d, logits in enumerate(output.mtp_logits, start=1):
        target = labels[:, d:]
        out[f"mtp{d}"] = F.cross_entropy(logits.reshape(-1, V).float(), target.reshape(-1), ignore_index=ignore_index)
    return out


def training_losses(
    output: CausalLMOutput,
    labels: torch.Tensor,
    *,
    mtp_weight: float = 0.0,
    z_loss: float = 0.0,
    balance: float = 0.0,
    indexer: float = 0.0,
    balance_loss=None,
) -> dict[str, torch.Tensor]:
    """Every training loss and their weighted sum under "loss_total".

    mtp: mean over depths; z_loss: mean(h^2) of the last hidden state before the final norm;
    balance: `output.router.balance_loss()` unless `balance_loss` (a callable) supplies another,
    e.g. one over globally reduced expert counts; indexer: the LSA indexer's KL loss.
    """
    losses = lm_losses(output, labels)
    total = losses["lm"]
    mtp = [v for k, v in losses.items() if k.startswith("mtp")]
    if mtp:
        losses["mtp"] = torch.stack(mtp).mean()
        total = total + mtp_weight * losses["mtp"]
    if z_loss > 0:
        losses["z_loss"] = output.pre_norm_hidden.float().pow(2).mean()
        total = total + z_loss * losses["z_loss"]
    if balance > 0:
        losses["balance_loss"] = balance_loss() if balance_loss is not None else output.router.balance_loss()
        total = total + balance * losses["balance_loss"]
    if indexer > 0 and output.indexer_loss is not None:
        losses["indexer_loss"] = output.indexer_loss
        total = total + indexer * losses["indexer_loss"]
    losses["loss_total"] = total
    return losses


# Values generated per seeded block: large enough that a block costs far more than seeding a
# generator, small enough that a shard's partial blocks at either end cost little.
INIT_BLOCK_NUMEL = 1 << 20


def _block_seed(name: str, seed: int, block: int) -> int:
    # A digest is the same in every process (Python's hash() of a str is salted per process) and
    # mixes every input into the low 32 bits, all that the CPU generator's Mersenne Twister keeps.
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_values(name: str, shape, seed: int, std: float, *, offset=None, size=None,
                device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """The initial values of the box `offset`..`offset+size` of the parameter `name` of global
    `shape` (>= 2 dims): Normal(0, std) drawn in fp32, generated without the rest of the tensor,
    written into `out` (any dtype, the box's shape) or a new fp32 tensor.

    The tensor is read as rows of its last dim (prod(shape[:-1]) rows); each block of
    INIT_BLOCK_NUMEL values' worth of rows has its own generator seeded from (name, seed, block
    index). A box costs the blocks its rows touch, so a shard on any dim but the last costs about
    itself; a shard of the last dim (row-wise tensor parallel) costs its rows.
    """
    shape = tuple(int(d) for d in shape)
    offset = tuple(offset) if offset is not None else (0,) * len(shape)
    size = tuple(size) if size is not None else shape
    row_len = shape[-1]
    rows_per_block = max(1, INIT_BLOCK_NUMEL // row_len)
    total_rows = math.prod(shape[:-1])
    cached: dict[int, torch.Tensor] = {}

    def block(b: int) -> torch.Tensor:  # (rows of block b, row_len)
        if b not in cached:
            cached.clear()  # a box walks the blocks in order: keeping one is enough
            g = torch.Generator(device=device).manual_seed(_block_seed(name, seed, b))
            rows = min(rows_per_block, total_rows - b * rows_per_block)
            cached[b] = torch.empty(rows, row_len, device=device).normal_(0.0, std, generator=g)
        return cached[b]

    def pieces(start: int, count: int):  # global rows start..start+count, block by block
        for b in range(start // rows_per_block, (start + count - 1) // rows_per_block + 1):
            lo = max(start, b * rows_per_block) - b * rows_per_block
            hi = min(start + count, (b + 1) * rows_per_block) - b * rows_per_block
            yield block(b)[lo:hi]

    if out is None:
        out = torch.empty(size, device=device)
    if out.numel() == 0:
        return out
    rows_per_step = [math.prod(shape[k + 1:-1]) for k in range(len(shape) - 1)]  # of each leading dim
    cols = slice(offset[-1], offset[-1] + size[-1])
    # each index of the leading dims but the last picks one contiguous run of rows; it is written
    # block by block (cast to out's dtype), so nothing the size of the box is made on the way
    for outer in itertools.product(*(range(n) for n in size[:-2])):
        first = sum((offset[k] + i) * rows_per_step[k] for k, i in enumerate(outer)) + offset[-2] * rows_per_step[-1]
        target, done = out[outer], 0  # (size[-2], size[-1])
        for piece in pieces(first, size[-2]):
            target[done:done + piece.shape[0]] = piece[:, cols]
            done += piece.shape[0]
    return out


@torch.no_grad()
def init_parameter_(tensor: torch.Tensor, name: str, seed: int, std: float, *, global_shape=None,
                    offset=None) -> None:
    """Fill `tensor`, the box at `offset` of parameter `name` (global shape `global_shape`, default
    its own), with its initial values: ones for 1-D parameters (norm weights), else `init_values`."""
    if tensor.dim() <= 1:
        tensor.fill_(1.0)
        return
    init_values(name, global_shape or tensor.shape, seed, std, offset=offset, size=tensor.shape,
                device=tensor.device, out=tensor)


@torch.no_grad()
def init_buffers_(module: nn.Module, config: ModelConfig) -> None:
    """The buffers of every submodule: zero router bias, RoPE inverse frequencies from the config."""
    for sub in module.modules():
        bias = getattr(sub, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor) and not bias.is_meta:
            bias.zero_()
        if isinstance(sub, RotaryEmbedding) and not sub.inv_freq.is_meta:
            sub.inv_freq.copy_(RotaryEmbedding(config, 2 * sub.inv_freq.shape[0]).inv_freq)


def build_model(config: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int | None = 0) -> LongCatForCausalLM:
    """Build and initialise a model. device='meta' allocates nothing (for counting, planning, and
    `longcat.parallel.parallelize`, which fills only each rank's shard). `seed=None` draws the
    seed from torch's global generator."""
    with torch.device(device):
        model = LongCatForCausalLM(config)
    if str(device) != "meta":
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        model.init_weights(seed)
    if dtype is not None:
        model.to(dtype)
    return model
