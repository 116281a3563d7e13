"""Long-context evaluation: retrieval accuracy per task x length x depth, and perplexity against
context length on held-out text.

Retrieval: for every cell (task, length, depth), `samples` instances from
`longcat.data.longctx.RetrievalTasks` (filler cut from the held-out tokens) run as one batch
through the inference engine (chunked prefill into the latent cache, LSA when the model has it),
greedy, for as many tokens as the answer has; an instance counts as retrieved when the generated
text starts with the answer.

Perplexity: consecutive `length`-token windows of held-out text (`ppl_windows` of them) go through
the model in prefill chunks over a latent cache (the engine's path, every position's logits kept);
reported per length are the perplexity and bits per byte of the windows, and the perplexity of
their last quarters (the tokens that had the most context).

On N ranks (`group`), every prompt is prefilled context-parallel (each rank a contiguous slice
of it, `longcat.parallel.cp_prefill`; each rank ends with the whole prompt's cache), the few answer
tokens are decoded on every rank alike, and the perplexity windows are split over the ranks.

Before anything runs, each length is checked against the model's positions (YaRN included) and
against this machine's memory (`memory_estimate`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

GiB = 2**30


@dataclass
class LongContextSetup:
    tasks: Sequence[str] = ("passkey", "niah_single", "niah_multikey", "vt")
    lengths: Sequence[int] = (1024, 4096, 16384)
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4  # instances per cell (one batch)
    needle: str = "number"
    seed: int = 0
    prefill_chunk: int = 512
    perplexity: bool = True
    ppl_windows: int = 4  # held-out windows per length for the perplexity (a short split repeats)
    dense: bool = False  # attend to every token even when the model has LSA


def parse_length(text: str) -> int:
    """'16k' -> 16384, '1m' -> 1048576, '4096' -> 4096."""
    t = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise UserError(f"length '{text}' is not a number of tokens (e.g. 4096, 4k, 1m)") from None
    if value < 1 or not value.is_integer():
        raise UserError(f"length '{text}' must be a whole number of tokens >= 1")
    return int(value)


def check_positions(config, length: int, generated: int = 0) -> None:
    """A clear error when `length` tokens (plus `generated` new ones) exceed the positions the model
    is configured for."""
    limit = config.max_position_embeddings
    if length + generated <= limit:
        return
    what = f"{length:,} tokens" + (f" plus {generated} generated" if generated else "")
    if config.yarn_enabled:
        raise UserError(
            f"{what} exceed the model's max_position_embeddings ({limit:,}; YaRN factor "
            f"{config.yarn_factor:g} over yarn_original_max_position_embeddings "
            f"{config.yarn_original_max_position_embeddings:,}); extend further with `longcat train --stage yarn "
            "--yarn-factor F`, or ask for shorter lengths")
    raise UserError(
        f"{what} exceed the model's max_position_embeddings ({limit:,}; no YaRN: yarn_factor = 1); "
        "extend it with `longcat train --stage yarn --yarn-factor F --init-from RUN`, or ask for shorter lengths")


def memory_estimate(config, length: int, *, batch: int, prefill_chunk: int, dtype_bytes: int = 4,
                    weights_bytes: int = 0, prefill_rows: int | None = None) -> dict[str, float]:
    """Bytes one batch of `length`-token prompts needs: the latent cache, and the largest prefill
    chunk's working set over the whole context (causal and selection masks, indexer scores per
    indexer head, gathered keys), which grows with the context. `prefill_rows`: prompts prefilled
    together (default: the batch; 1 for the context-parallel prefill, one prompt at a time)."""
    from ..model import LatentCache

    cache = LatentCache.bytes_per_token(config, dtype_bytes, with_mtp=config.mtp_num_layers > 0) * length * batch
    chunk = min(prefill_chunk, length)
    per_pair = 3 + 4 * (3 + max(1, config.index_n_heads)) if config.lsa_enabled else 1 + 4 * 2 * config.num_attention_heads
    working = (batch if prefill_rows is None else prefill_rows) * chunk * length * per_pair
    total = cache + working + weights_bytes
    return {"cache_bytes": cache, "prefill_bytes": working, "weights_bytes": weights_bytes, "total_bytes": total}


def check_memory(config, lengths: Sequence[int], *, batch: int, prefill_chunk: int, weights_bytes: int,
                 flag: str = "--lengths", ranks: int = 1) -> None:
    """Refuse, before any work, a length whose estimate exceeds the memory available now (on
    `ranks` local processes of a context-parallel prefill: each holds the weights and the cache, and
    prefills a 1/ranks slice of one prompt at a time)."""
    import psutil

    available = psutil.virtual_memory().available
    for length in lengths:
        chunk = prefill_chunk if ranks == 1 else -(-length // ranks)
        est = memory_estimate(config, length, batch=batch, prefill_chunk=chunk, weights_bytes=weights_bytes,
                              prefill_rows=None if ranks == 1 else 1)
        if ranks * est["total_bytes"] > 0.9 * available:
            shape = (f"chunk {min(prefill_chunk, length)} x batch {batch}" if ranks == 1 else
                     f"a slice of {min(chunk, length):,} positions per rank, {ranks} ranks")
            raise UserError(
                f"{length:,} tokens need about {ranks * est['total_bytes'] / GiB:.1f} GiB (latent cache "
                f"{est['cache_bytes'] / GiB:.1f} GiB, prefill working set {est['prefill_bytes'] / GiB:.1f} GiB at "
                f"{shape}, weights {weights_bytes / GiB:.2f} GiB{', per rank' if ranks > 1 else ''}) but "
                f"{available / GiB:.1f} GiB are available; lower {flag}, the batch"
                + (" or --prefill-chunk" if ranks == 1 else " or --nproc"))


# ---------------------------------------------------------------------------------------------------


def heldout_tokens(tokenizer, need: int, *, data: str | None = None, text_field: str = "text") -> tuple[np.ndarray, float]:
    """(at least `need` tokens of held-out documents, eos-separated and repeated if the split is
    short; their tokens per UTF-8 byte, for bits per byte)."""
    from ..data import iter_documents

    out: list[int] = []
    nbytes = 0
    for doc in iter_documents(data, text_field=text_field, split="heldout"):
        out += tokenizer.encode(doc) + [tokenizer.eos_id]
        nbytes += len(doc.encode("utf-8"))
        if len(out) >= need:
            break
    if len(out) < 64:
        raise UserError(f"the held-out split of {data or 'the embedded corpus'} has {len(out)} tokens; give --data "
                        "with more text")
    reps = -(-need // len(out))
    return np.asarray(out * reps, dtype=np.int64)[: max(need, len(out))], len(out) / max(1, nbytes)


@torch.inference_mode()
def window_losses(model, tokens: torch.Tensor, chunk: int, *, cache=None) -> torch.Tensor:
    """Next-token losses (T-1,) of one token window (T,), prefilled chunk by chunk over a latent
    cache as the engine does (the n-gram embedding reads the tokens before each chunk). `cache`
    (one row, at least T positions) keeps the keys of positions 0..T-2 for the caller."""
    from ..infer.batch import token_history
    from ..model import LatentCache

    T = tokens.numel()
    config = model.config
    dtype = model.embed_tokens.weight.dtype
    if cache is None:
        cache = LatentCache(config, 1, T, dtype=dtype, device=tokens.device, with_mtp=False)
    row = tokens.view(1, T)
    width = config.oe_neighbor_num - 1 if config.ngram_enabled else 0
    losses = []
    for s in range(0, T - 1, chunk):
        e = min(T - 1, s + chunk)
        positions = torch.arange(s, e, device=tokens.device).unsqueeze(0)
        history = token_history(row, torch.tensor([s], device=tokens.device), width) if width else None
        out = model(row[:, s:e], positions=positions, cache=cache, ngram_history=history, mtp=False,
                    indexer_loss=False)
        losses.append(F.cross_entropy(out.logits[0].float(), row[0, s + 1:e + 1], reduction="none"))
    return torch.cat(losses)


@dataclass
class LongContextReport:
    accuracy: dict[str, dict[int, dict[float, float]]] = field(default_factory=dict)  # task -> length -> depth
    perplexity: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    setup: dict = field(default_factory=dict)

    def task_accuracy(self, task: str) -> float:
        cells = [a for by_depth in self.accuracy[task].values() for a in by_depth.values()]
        return sum(cells) / len(cells)

    def to_dict(self) -> dict:
        return {
            "setup": self.setup,
            "accuracy": {t: {str(L): {f"{d:g}": a for d, a in by_d.items()} for L, by_d in by_len.items()}
                         for t, by_len in self.accuracy.items()},
            "task_accuracy": {t: self.task_accuracy(t) for t in self.accuracy},
            "perplexity": self.perplexity,
            "seconds": self.seconds,
        }


def run_longctx(model, tokenizer, setup: LongContextSetup, *, data: str | None = None,
                log: Callable[[str], None] = lambda _: None, group=None) -> LongContextReport:
    """Every cell of setup.tasks x lengths x depths, then the perplexity curve. Checks first.
    `group`: a process group of several ranks, each holding the whole model; the prompts are then
    prefilled context-parallel over it (every rank runs this call and gets the same report)."""
    import functools

    import torch.distributed as dist

    from ..data.longctx import RetrievalTasks, parse_tasks
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams

    ranks = dist.get_world_size(group) if dist.is_initialized() else 1
    prefill_fn = None
    if ranks > 1:
        from ..parallel.cp_prefill import prefill_context_parallel

        prefill_fn = functools.partial(prefill_context_parallel, group=group)
    config = model.config
    # no tasks: the perplexity curve only
    tasks_list = parse_tasks(list(setup.tasks)) if list(setup.tasks) not in ([], ["none"]) else []
    if not tasks_list and not setup.perplexity:
        raise UserError("nothing to evaluate: give --tasks, or leave out --no-perplexity")
    lengths = sorted(set(setup.lengths))
    if setup.samples < 1:
        raise UserError(f"--samples must be >= 1, got {setup.samples}")
    bad_depths = [d for d in setup.depths if not 0.0 <= d <= 1.0]
    if bad_depths:
        raise UserError(f"--depths must lie in [0, 1], got {bad_depths}")
    # positions a prompt's answer needs after it: the longest answer of any instance asked for
    answers = RetrievalTasks(tokenizer, None, seed=setup.seed, needle=setup.needle)
    answer_room = max((answers.answer_length(t, d, i) + 2 for t in tasks_list for d in setup.depths
                       for i in range(setup.samples)), default=0)
    for length in lengths:
        check_positions(config, length, answer_room)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if ranks > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
        check_memory(config, lengths, batch=setup.samples, prefill_chunk=setup.prefill_chunk, weights_bytes=weights,
                     ranks=local)
    else:
        check_memory(config, lengths, batch=setup.samples, prefill_chunk=setup.prefill_chunk, weights_bytes=weights)

    t0 = time.perf_counter()
    model.eval()
    if config.lsa_enabled:
        model.lsa_mode = "dense" if setup.dense else "sparse"
    windows = max(1, setup.ppl_windows) if setup.perplexity else 1
    stream, _ = heldout_tokens(tokenizer, windows * max(lengths) + 1, data=data)
    generator = RetrievalTasks(tokenizer, stream, seed=setup.seed, needle=setup.needle)
    prefix = [int(t) for t in getattr(tokenizer, "prompt_prefix", [])]
    engine = Engine(model, tokenizer, max_seq_len=max(lengths) + max(2, answer_room), prefill_chunk=setup.prefill_chunk,
                    prefill_fn=prefill_fn)
    report = LongContextReport(setup={
        "tasks": tasks_list, "lengths": lengths, "depths": list(setup.depths), "samples": setup.samples,
        "needle": setup.needle, "seed": setup.seed, "prefill_chunk": setup.prefill_chunk,
        "attention": "dense" if (setup.dense or not config.lsa_enabled) else f"LSA top-{config.index_topk}",
        "ranks": ranks, "prefill": "context-parallel" if ranks > 1 else "chunked",
    })
    for task in tasks_list:
        report.accuracy[task] = {}
        for length in lengths:
            report.accuracy[task][length] = {}
            for depth in setup.depths:
                examples = [generator.example(task, length - len(prefix), depth, index=i) for i in range(setup.samples)]
                prompts = [prefix + ex.input_ids for ex in examples]
                params = [SamplingParams(max_new_tokens=len(ex.answer_ids) + 2, temperature=0.0, ignore_eos=True)
                          for ex in examples]
                results = engine.generate(prompts, params)
                hits = [tokenizer.decode(r.token_ids).strip().startswith(ex.answer) for r, ex in zip(results, examples)]
                report.accuracy[task][length][depth] = sum(hits) / len(hits)
                log(f"{task:14s} {length:>8,} tokens  depth {depth:4.2f}  accuracy {sum(hits)}/{len(hits)}")
    engine.release()
    if setup.perplexity:
        device = model.embed_tokens.weight.device
        for length in lengths:
            # consecutive windows of the held-out stream; the same tokens for every model evaluated
            count = max(1, min(windows, (len(stream) - 1) // length))
            rank = dist.get_rank(group) if ranks > 1 else 0
            # on several ranks each computes every ranks-th window; the losses are then gathered
            mine = {i: window_losses(model, torch.as_tensor(stream[i * length: (i + 1) * length + 1], device=device),
                                     setup.prefill_chunk) for i in range(rank, count, ranks)}
            if ranks > 1:
                gathered: list = [None] * ranks
                dist.all_gather_object(gathered, {i: t.cpu() for i, t in mine.items()}, group=group)
                mine = {i: t.to(device) for part in gathered for i, t in part.items()}
            losses = torch.stack([mine[i] for i in range(count)])  # (windows, length)
            tail = losses[:, -max(1, length // 4):]
            loss = float(losses.mean())
            # bits per byte of the text these windows predict (their own bytes, not an average over
            # however much held-out text was read, so a length gives the same figure in any run)
            predicted_bytes = sum(len(tokenizer.decode([int(t) for t in stream[i * length + 1: (i + 1) * length + 1]])
                                      .encode("utf-8")) for i in range(count))
            bpb = float(losses.sum()) / math.log(2) / max(1, predicted_bytes)
            entry = {"context": length, "windows": count, "loss": loss, "ppl": math.exp(loss),
                     "tail_ppl": math.exp(float(tail.mean())), "bpb": bpb}
            report.perplexity.append(entry)
            log(f"perplexity at {length:>8,} tokens: {entry['ppl']:.2f} (last quarter {entry['tail_ppl']:.2f}), "
                f"{entry['bpb']:.4f} bits/byte over {count} window(s)")
    report.seconds = time.perf_counter() - t0
    return report


def plot_heatmaps(report: LongContextReport, out_dir) -> list:
    """One depth x length heatmap PNG per task in out_dir (matplotlib, Agg backend)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, by_len in report.accuracy.items():
        lengths = sorted(by_len)
        depths = sorted({d for by_d in by_len.values() for d in by_d})
        grid = np.array([[by_len[L][d] for L in lengths] for d in depths])  # (depths, lengths)
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.5 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_short(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task}: accuracy {report.task_accuracy(task):.0%}")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"heatmap_{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _short(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


__all__ = ["LongContextSetup", "LongContextReport", "run_longctx", "plot_heatmaps", "parse_length", "check_positions",
           "memory_estimate", "check_memory", "window_losses", "heldout_tokens"]
