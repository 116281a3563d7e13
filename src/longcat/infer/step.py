"""Decode steps: the model's own decode forward (`LongCatForCausalLM.decode`, `decode_mtp`, `head`),
run eagerly or wrapped by torch.compile. There is no second copy of the model's math here: the
compiled mode differs only in the wrapping and the static shapes it needs (the gpt-fast recipe).

Compiled, a step is one graph from the token ids to the logits. The cache goes in as its
allocations (`LatentCache.storage`) and the step writes its keys into them in place; the span
attended over is the size of a tensor (`_length_marker`), and the allocation sizes are dynamic
from the first call, so one graph serves every cache length and every re-allocation (left to
torch.compile's automatic dynamic shapes, each would first be a constant and cost a recompile the
first time it changed). Rows are static: a batch runs padded to the next of ROW_BUCKETS (the padded
rows repeat row 0, write spare rows of the allocation, which the engine sizes to the bucket, and
their results are dropped), one graph per bucket and tokens-per-row count, so that a finishing
row reuses a graph instead of turning the row count into a symbol (which makes the weight loops
slower). Guards on the model are skipped: its weights are graph inputs, read on every call, and a
guard per weight on every step is a cost the size of the small kernels of a step.

On CPU the compiled mode also moves the weights into memory advised for transparent huge pages
(`huge_page_weights`): every step streams all of them, and with 4 KB pages each page costs a TLB
miss and stops the hardware prefetchers at its boundary.

Where a graph does not apply the step runs eagerly, with the same code: LongCat sparse attention
once a context outgrows `index_topk` (the selection is data-dependent) and more than MAX_ROWS
tokens in flight.
"""

from __future__ import annotations

import mmap
import re

import torch

from ..model import LatentCache, LongCatForCausalLM
from .sampling import GenerationError
from .speculative import draft_head, greedy_accept

# Tokens per step up to which a step runs compiled (the MoE's pair-by-pair path, moe.GATHER_TOKENS).
MAX_ROWS = 64
# Batch sizes the graphs are compiled for: a batch runs padded to the next one.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Tokens per row up to which a draft window runs compiled (steady state: drafts + MTP heads).
MTP_WINDOW = 8
INDUCTOR_OPTIONS = {"cpp_wrapper": True}  # no Python between the generated kernels


def row_bucket(rows: int) -> int:
    """The compiled batch size that serves `rows` rows (rows itself above the largest bucket)."""
    return next((b for b in ROW_BUCKETS if b >= rows), rows)


def _skip_model_guards(entries) -> list[bool]:
    """Keep every guard except those on the model (its modules, weights and config): the weights
    are inputs of the graph, read on every call (in-place updates and replaced tensors are seen),
    and the engine checks their dtype and device once per generation (`DecodeStep.prepare`); one
    compiled function serves one model. Checking them on every step would cost a guard per weight."""
    return [_root(e.name) != "model" for e in entries]


def _root(name: str) -> str:
    """The local a guard's source starts from: "model._modules['layers']" and "type(model)" -> "model"."""
    while name.startswith(("type(", "dict(")):
        name = name[5:]
    return re.split(r"[.\[)]", name, maxsplit=1)[0]


def _decode(model, ids, positions, history, storage, span, num_sublayers: int, last_only: bool):
    cache = LatentCache.over(model.config, storage, ids.shape[0], span.shape[0], num_sublayers)
    return model.decode(ids, positions, cache, history, last_only=last_only)


def _draft(model, depth: int, ids, prev, positions, history, storage, span, num_sublayers: int, vocab: int):
    cache = LatentCache.over(model.config, storage, ids.shape[0], span.shape[0], num_sublayers)
    h, normed = model.decode_mtp(depth, ids, prev, positions, cache, history)
    return h, draft_head(model, normed[:, -1], vocab)


def _speculate_greedy(model, seq, prev, positions, storage, span, num_sublayers: int, depths: int, k: int,
                      history: int, vocab: int):
    """A whole greedy speculative step in one graph: the draft chain (MTPDrafter.draft's steady
    state, argmax between drafts), the verify forward over [x[n], drafts] and the acceptance, so
    that the host reads one small tensor per step. seq (B, history+W+1): the committed tokens at
    positions n-W-history..n; prev (B, W, H): the main model's hidden at n-W..n-1; positions
    (B, W+k+1): n-W..n+k. The drafts extend seq, so a head's ids and n-gram history index one row.
    vocab: the drafts' argmax runs over the first `vocab` ids (`draft_head`); the verify over all.

    -> (emitted (B, k+2): the accepted drafts, the token after them and, last, the accepted count
    a; columns a+1..k are leftovers, overwritten before use), verify pre-norm hidden (B, k+1, H),
    hidden of depths 1..depths-1 over the window (depths-1, B, W, H))."""
    B, W = prev.shape[0], prev.shape[1]
    cache = LatentCache.over(model.config, storage, B, span.shape[0], num_sublayers)
    window = positions[:, :W]
    e, h, kept = seq, prev, []
    for d in range(1, depths + 1):
        grams = e[:, d : d + history] if history else None
        h, normed = model.decode_mtp(d, e[:, history + d : history + d + W], h, window, cache, grams)
        kept.append(h)
        e = torch.cat([e, draft_head(model, normed[:, -1], vocab).argmax(-1, keepdim=True)], 1)
    last = h[:, -1:]
    # more drafts than heads: the last head runs on, its output standing in for the hidden state
    for j in range(depths + 1, k + 1):
        at = W + history + j - 1  # the column of position n+j-1 in e
        grams = e[:, at - history : at] if history else None
        at_pos = positions[:, W + j - depths - 1 : W + j - depths]
        last, normed = model.decode_mtp(depths, e[:, at : at + 1], last, at_pos, cache, grams)
        e = torch.cat([e, draft_head(model, normed[:, -1], vocab).argmax(-1, keepdim=True)], 1)
    at = W + history  # the column of x[n]
    grams = e[:, W:at] if history else None
    logits, hidden = model.decode(e[:, at : at + k + 1], positions[:, W:], cache, grams, last_only=False)
    drafts, targets = e[:, at + 1 :], logits.argmax(-1)  # (B, k), (B, k+1)
    accepted = greedy_accept(targets, drafts).unsqueeze(1)  # (B, 1)
    following = targets.gather(1, accepted)
    emitted = torch.cat([drafts, following, accepted], 1).scatter(1, accepted, following)
    deeper = torch.stack(kept[:-1]) if depths > 1 else h.new_zeros(0, *h.shape)
    return emitted, hidden, deeper


class DecodeStep:
    """What the engine calls for decode steps: `forward` (the main model) and `draft` (an MTP head
    and the output head), eagerly (`compile=False`) or through torch.compile'd graphs of the same
    model methods; `mtp` and `head` (the first draft over a whole prompt) always run eagerly."""

    def __init__(self, model: LongCatForCausalLM, *, compile: bool = False) -> None:
        self.model = model
        self.config = model.config
        self.compiled = compile
        if compile:
            # graphs: per row bucket, tokens per row, last-only logits or all
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            options = dict(INDUCTOR_OPTIONS, guard_filter_fn=_skip_model_guards)
            self._decode = torch.compile(_decode, fullgraph=True, options=options)
            self._draft = torch.compile(_draft, fullgraph=True, options=options)
            self._speculate = torch.compile(_speculate_greedy, fullgraph=True, options=options)
            if next(model.parameters()).device.type == "cpu":
                huge_page_weights(model)
            self._weights = self._signature()

    def _signature(self) -> set:
        return {(t.dtype, t.device) for t in self.model.state_dict().values()}

    def prepare(self) -> None:
        """Called before each generation: the graphs do not check the weights on every call."""
        if self.compiled and self._signature() != self._weights:
            raise GenerationError("the model's weights changed dtype or device since this Engine compiled its decode "
                               "step; make a new Engine for the moved model")

    def cache_rows(self, batch: int) -> int:
        """Cache rows a batch of `batch` sequences needs (compiled: its row bucket, for the padding)."""
        return row_bucket(batch) if self.compiled else batch

    def rows_for(self, batch: int, cache: LatentCache) -> int:
        """The padded batch a compiled step of `batch` rows runs as: its bucket, when the cache's
        allocation has that many rows, else the batch itself."""
        rows = row_bucket(batch)
        return rows if rows <= cache.allocated_rows else batch

    def _applies(self, tokens: int, span: int) -> bool:
        if not self.compiled or tokens > MAX_ROWS:
            return False
        c = self.config
        # LSA selection is data-dependent: once a context outgrows index_topk, decode eagerly
        return not (c.lsa_enabled and self.model.lsa_mode == "sparse" and span > c.index_topk)

    def _graph_inputs(self, cache: LatentCache, rows: int, *tensors, span: int | None = None):
        """The padded, static-marked tensors, the cache allocations, the span marker (the cache's
        span, or `span`) and the sublayer count of a graph call."""
        padded = []
        for t in tensors:
            if t is not None:
                t = _pad(t, rows)
                for dim in range(min(t.dim(), 2)):  # rows and tokens per row: one graph each
                    torch._dynamo.mark_static(t, dim)
            padded.append(t)
        storage = cache.storage()
        for t in storage:
            if t is not None:  # (sublayers * allocated rows, max_len, d): any allocation, one graph
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
        return padded, storage, _length_marker(cache.span if span is None else span), cache.num_sublayers

    def forward(self, ids, positions, cache: LatentCache, history=None, *, last_only: bool = True):
        """ids, positions (B, T) -> (logits (B, 1 or T, V), pre-norm hidden (B, T, H))."""
        cache.begin(positions)  # checks the capacity; span = max position + 1
        if not self._applies(ids.numel(), cache.span):
            return self.model.decode(ids, positions, cache, history, last_only=last_only)
        B = ids.shape[0]
        (ids, positions, history), storage, span, n = self._graph_inputs(cache, self.rows_for(B, cache), ids,
                                                                         positions, history)
        logits, hidden = self._decode(self.model, ids, positions, history, storage, span, n, last_only)
        return logits[:B], hidden[:B]

    def draft(self, depth: int, ids, prev, positions, cache: LatentCache, history=None, *,
              vocab: int | None = None):
        """MTP head `depth` (1-based) over a steady-state draft window, and the output head on its
        last position: ids (B, T) the tokens `depth` ahead of positions (B, T), prev (B, T, H) ->
        (hidden (B, T, H), logits over the first `vocab` ids (B, vocab); default all V)."""
        vocab = self.config.vocab_size if vocab is None else vocab
        cache.begin(positions)
        if ids.shape[1] > MTP_WINDOW or not self._applies(ids.numel(), cache.span):
            h, normed = self.model.decode_mtp(depth, ids, prev, positions, cache, history)
            return h, draft_head(self.model, normed[:, -1], vocab)
        B = ids.shape[0]
        (ids, prev, positions, history), storage, span, n = self._graph_inputs(
            cache, self.rows_for(B, cache), ids, prev, positions, history)
        h, logits = self._draft(self.model, depth, ids, prev, positions, history, storage, span, n, vocab)
        return h[:B], logits[:B]

    def fuses_speculation(self, rows: int, k: int, window: int, span: int) -> bool:
        """Whether `speculate_greedy` runs as one graph for `rows` rows, k drafts, an MTP window of
        `window` positions and a verify span of `span` positions."""
        return window <= MTP_WINDOW and self._applies(rows * max(window, k + 1), span)

    def speculate_greedy(self, seq, prev, positions, cache: LatentCache, depths: int, k: int, history: int,
                         span: int, vocab: int | None = None):
        """A greedy speculative step as one compiled graph (`_speculate_greedy`: one dispatch
        instead of one per draft plus the verify, argmax and acceptance on the graph's side); the
        caller checks `fuses_speculation` first. span: max(positions) + 1, known to the caller (no
        device-to-host read for it). vocab: the draft vocabulary (the first `vocab` ids; default
        all). -> (emitted (B, k+2) with the accepted count last, verify
        hidden (B, k+1, H), hidden of the lower MTP depths (depths-1, B, W, H))."""
        if span > cache.max_len:
            raise GenerationError(f"position {span - 1} does not fit the cache of {cache.max_len} tokens: the "
                                  "caller sizes the cache for the prompt, the new tokens and k drafts")
        B = seq.shape[0]
        (seq, prev, positions), storage, marker, n = self._graph_inputs(cache, self.rows_for(B, cache), seq, prev,
                                                                        positions, span=span)
        vocab = self.config.vocab_size if vocab is None else vocab
        emitted, hidden, deeper = self._speculate(self.model, seq, prev, positions, storage, marker, n, depths, k,
                                                  history, vocab)
        return emitted[:B], hidden[:B], deeper[:, :B]

    def mtp(self, depth: int, ids, prev, positions, cache: LatentCache, history=None):
        """MTP head `depth` over any window (the first draft after a prefill), eagerly -> (hidden,
        normed hidden)."""
        cache.begin(positions)
        return self.model.decode_mtp(depth, ids, prev, positions, cache, history)

    def head(self, normed: torch.Tensor, *, vocab: int | None = None) -> torch.Tensor:
        """The output head over the first `vocab` ids (default all V), eagerly: (..., H) -> (..., vocab)."""
        return draft_head(self.model, normed, self.config.vocab_size if vocab is None else vocab)


# Below this, a buffer gains little from huge pages (a huge page is 2 MB).
HUGE_PAGE_MIN_BYTES = 4 << 20
# Each tensor starts on a cache line in the shared buffer (inductor copies misaligned inputs).
_ALIGN_BYTES = 64


def _huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """Fresh private memory advised for transparent huge pages (THP's common "madvise" mode gives
    them only to memory that asks), as a byte tensor; None where the OS has no such advice."""
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is None or nbytes < HUGE_PAGE_MIN_BYTES:
        return None
    # private and anonymous: shared anonymous memory is shmem, which THP does not back by default
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(advise)  # before the first touch: pages fault in huge
    except OSError:  # a kernel without THP: ordinary allocations serve as well
        return None
    return torch.frombuffer(memory, dtype=torch.uint8, count=nbytes)  # keeps `memory` alive


@torch.no_grad()
def huge_page_weights(model: torch.nn.Module) -> bool:
    """Move the model's CPU parameters and buffers into one huge-page buffer: each tensor becomes a
    view of it (same values, still the model's own: in-place updates, saving and loading work as
    before). Returns whether it did (False where the OS offers no huge pages)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu"}
    sizes = [-(-t.numel() * t.element_size() // _ALIGN_BYTES) * _ALIGN_BYTES for t in tensors.values()]
    flat = _huge_page_buffer(sum(sizes))
    if flat is None:
        return False
    offset = 0
    for t, size in zip(tensors.values(), sizes):
        view = flat[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        t.data = view
        offset += size
    return True


_ONE = torch.zeros(1)


def _length_marker(length: int) -> torch.Tensor:
    """A tensor of `length` elements (a stride-0 view: nothing allocated) whose size is dynamic from
    the first call. Passed as an int, the span would be a constant in the first graph and a symbol
    only from the second step on: every graph would compile twice."""
    marker = _ONE.expand(length)
    torch._dynamo.maybe_mark_dynamic(marker, 0)
    return marker


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with its first dim padded to `rows` by repeating its first row (valid positions, finite
    values; the padded rows' results are dropped)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


__all__ = ["DecodeStep", "huge_page_weights", "row_bucket", "ROW_BUCKETS", "MAX_ROWS"]
