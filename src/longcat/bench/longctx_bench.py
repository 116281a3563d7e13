"""`longcat bench longctx`: a long prompt prefilled with LSA through the engine's chunked path,
decoding at that context, and dense attention vs LSA against context length.

Three sections:

1. The run at --context: `Engine.generate` of one random-token prompt of that length, greedy for
   --new-tokens tokens. Prefill tokens/s is the prompt over the time to the first token; decode
   ms/token is the time after the first token over the tokens after it. The same at 16K
   (`decode_ms_per_token_16k`) as the reference. The latent cache the engine allocated is set next
   to what the planner (`longcat plan serve --engine longcat`) predicts for that model and context.
2. The decode curve: for each length of --curve up to --context, one decode step over a latent
   cache of that length, LSA and dense (median ms of --decode-steps steps; the cache holds random
   latents: the step's time and memory do not depend on the values, only on the length). `--clock
   cpu` times the steps in process CPU time instead of wall time: on a machine shared with other
   jobs it leaves out the time spent waiting for a core (with --threads 1 it is the step's latency
   on an idle core, up to the memory bandwidth the other jobs take).
3. LSA fidelity: for each curve length up to --fidelity-max, a real prefill, then the share of the
   dense attention distribution (summed over heads, every layer's first sublayer) that falls on the
   tokens LSA selects for the next query.

The model is a preset with random weights (or --model), its positions raised to the context when
they are shorter (YaRN factor scaled to match when the preset uses YaRN).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

GiB = 2**30
REFERENCE_CONTEXT = 16384
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_model(preset_name: str, context: int, new_tokens: int, model_dir: str | None, overrides: dict):
    """A model whose positions cover context + new tokens."""
    from ..config import preset
    from ..model import build_model

    if model_dir is not None:
        from .. import load

        model = load(model_dir)
    else:
        config = preset(preset_name, **overrides)
        need = context + new_tokens + 8
        if config.max_position_embeddings < need:
            changes = {"max_position_embeddings": need}
            if config.yarn_enabled:
                changes["yarn_factor"] = need / config.yarn_original_max_position_embeddings
            config = config.replace(**changes)
        model = build_model(config, seed=0)
    return model.eval()


def planner_cache_bytes(config, tokens: int, with_mtp: bool, dtype: torch.dtype) -> float:
    """What `longcat plan serve --engine longcat` predicts for one sequence of `tokens` tokens."""
    from ..plan.arch import from_longcat
    from ..plan.engines import kv_layout, load_engine

    kv = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return kv_layout(from_longcat(config), load_engine("longcat"), kv, mtp=with_mtp)["total"] * tokens


def peak_rss_gib() -> tuple[float, str]:
    """This process's own peak resident set in GiB and the counter it came from (VmHWM or ru_maxrss)."""
    from ..telemetry import peak_rss

    peak, source = peak_rss()
    return peak / GiB, source


def _generate(engine, context: int, new_tokens: int, seed: int) -> dict:
    from ..infer.sampling import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, engine.config.vocab_size, (context,), generator=gen).tolist()
    r = engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))[0]
    decode_s = r.total_s - r.ttft_s
    return {"prefill_s": r.ttft_s, "prefill_tokens_per_s": context / r.ttft_s,
            "decode_ms_per_token": 1000 * decode_s / max(1, len(r.token_ids) - 1)}


@torch.inference_mode()
def decode_step_ms(model, length: int, mode: str, steps: int, clock: str = "wall") -> float:
    """Median ms of one decode step at position `length` over a cache of random latents, timed by
    `clock` ("wall" or "cpu": this process's CPU time)."""
    from ..model import LatentCache

    config = model.config
    dtype = model.embed_tokens.weight.dtype
    cache = LatentCache(config, 1, length + 1, dtype=dtype, with_mtp=False)
    for store in cache.storage():
        if store is not None:
            store.normal_()
    previous = model.lsa_mode
    model.lsa_mode = mode
    ids = torch.tensor([[5]])
    positions = torch.tensor([[length]])
    history = torch.full((1, config.oe_neighbor_num - 1), 5) if config.ngram_enabled else None
    now = CLOCKS[clock]
    times = []
    try:
        for _ in range(steps + 1):
            cache.begin(positions)
            t = now()
            model.decode(ids, positions, cache, history)
            times.append(1000 * (now() - t))
    finally:
        model.lsa_mode = previous
    return statistics.median(times[1:])


@torch.inference_mode()
def lsa_fidelity(model, length: int, chunk: int, seed: int = 0) -> float | None:
    """Share of the dense attention mass of the query at position `length` that lands on the
    tokens LSA selects (mean over layers), after a real chunked prefill of `length` tokens."""
    from ..eval.longctx import window_losses
    from ..model import LatentCache
    from ..model.attention import MLA

    config = model.config
    if not config.lsa_enabled or length <= config.index_topk:
        return None
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, config.vocab_size, (length + 1,), generator=gen)
    cache = LatentCache(config, 1, length + 1, dtype=model.embed_tokens.weight.dtype, with_mtp=False)
    window_losses(model, tokens, chunk, cache=cache)  # positions 0..length-1
    shares: list[float] = []
    layers = [layer.self_attn[0] for layer in model.layers]

    def capture(mla: MLA):
        original = mla._selected_path

        def wrapped(q_nope, q_rope, c_kv_all, k_rope_all, selection):
            B, T, S = q_nope.shape[0], q_nope.shape[1], c_kv_all.shape[1]
            causal = torch.ones(B, T, S, dtype=torch.bool)  # the one query sees every cached key
            dense = mla._attention_target(q_nope, q_rope, c_kv_all, k_rope_all, causal)  # (B, T, S)
            kept = dense.gather(-1, selection.index) * selection.valid  # (B, T, k)
            shares.append(float(kept.sum(-1).mean()))
            return original(q_nope, q_rope, c_kv_all, k_rope_all, selection)

        return wrapped

    for mla in layers:
        mla._selected_path = capture(mla)
    try:
        model.lsa_mode = "sparse"
        positions = torch.tensor([[length]])
        cache.begin(positions)
        history = None
        if config.ngram_enabled:
            w = config.oe_neighbor_num - 1
            history = tokens[length - w:length].view(1, w)
        model.decode(tokens[length:length + 1].view(1, 1), positions, cache, history)
    finally:
        for mla in layers:
            del mla._selected_path
    return sum(shares) / len(shares) if shares else None


def run_longctx_bench(*, preset_name: str, context: int, new_tokens: int = 64, curve: list[int] | None = None,
                      fidelity_max: int = 16384, prefill_chunk: int = 0, decode_steps: int = 5,
                      model_dir: str | None = None, overrides: dict | None = None, skip_run: bool = False,
                      clock: str = "wall", log: Callable[[str], None] = print) -> dict:
    from ..eval.longctx import check_memory, memory_estimate
    from ..infer.engine import Engine

    t_wall = time.perf_counter()
    model = bench_model(preset_name, context, new_tokens, model_dir, overrides or {})
    config = model.config
    chunk = prefill_chunk or auto_chunk(config, context)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    check_memory(config, [context + new_tokens], batch=1, prefill_chunk=chunk, weights_bytes=weights, flag="--context")
    dtype = model.embed_tokens.weight.dtype
    result: dict = {"preset": preset_name if model_dir is None else None, "model": model_dir,
                    "context_tokens": context, "new_tokens": new_tokens, "prefill_chunk": chunk,
                    "index_topk": config.index_topk if config.lsa_enabled else None,
                    "threads": torch.get_num_threads(), "curve_clock": clock}
    if not skip_run:
        engine = Engine(model, max_seq_len=context + new_tokens + 8, prefill_chunk=chunk)
        ref = min(REFERENCE_CONTEXT, context)
        log(f"prefill {ref:,} tokens and decode {new_tokens} (reference)")
        short = _generate(engine, ref, new_tokens, seed=1)
        log(f"  {short['prefill_tokens_per_s']:,.0f} prefill tokens/s, {short['decode_ms_per_token']:.2f} ms/token")
        log(f"prefill {context:,} tokens (LSA, chunks of {chunk}) and decode {new_tokens}")
        full = _generate(engine, context, new_tokens, seed=2)
        log(f"  {full['prefill_tokens_per_s']:,.0f} prefill tokens/s in {full['prefill_s']:.0f} s, "
            f"{full['decode_ms_per_token']:.2f} ms/token")
        cache = engine._cache
        with_mtp = cache.num_sublayers > 2 * config.num_layers
        cached_tokens = cache.max_len
        result.update(
            prefill_tokens_per_s=full["prefill_tokens_per_s"], prefill_s=full["prefill_s"],
            decode_ms_per_token_16k=short["decode_ms_per_token"], reference_context=ref,
            decode_ms_per_token_at_context=full["decode_ms_per_token"],
            decode_ratio=full["decode_ms_per_token"] / short["decode_ms_per_token"],
            cache_bytes=cache.nbytes(), cache_tokens=cached_tokens,
            planner_cache_bytes=planner_cache_bytes(config, cached_tokens, with_mtp, dtype),
        )
        result["cache_vs_planner"] = result["cache_bytes"] / result["planner_cache_bytes"]
        engine.release()
        del engine, cache
    curve_points = []
    for length in sorted(set(curve or [])):
        if length > context:
            continue
        point = {"context": length,
                 "lsa_decode_ms": decode_step_ms(model, length, "sparse", decode_steps, clock)
                 if config.lsa_enabled else None,
                 "dense_decode_ms": decode_step_ms(model, length, "dense", decode_steps, clock),
                 "cache_bytes": memory_estimate(config, length, batch=1, prefill_chunk=1)["cache_bytes"]}
        if length <= fidelity_max:
            point["lsa_fidelity"] = lsa_fidelity(model, length, chunk)
        curve_points.append(point)
        lsa = f"{point['lsa_decode_ms']:.2f}" if point["lsa_decode_ms"] is not None else "-"
        fid = point.get("lsa_fidelity")
        log(f"  decode at {length:>9,}: LSA {lsa} ms, dense {point['dense_decode_ms']:.2f} ms"
            + (f", LSA keeps {fid:.1%} of the dense attention mass" if fid is not None else ""))
    result["curve"] = curve_points
    result["peak_rss_gib"], result["peak_rss_source"] = peak_rss_gib()
    result["wall_s"] = time.perf_counter() - t_wall
    return result


def auto_chunk(config, context: int, budget_bytes: float = 2 * GiB) -> int:
    """The largest power-of-two prefill chunk (at most 512) whose working set over the whole
    context stays within `budget_bytes` (the indexer scores every cached key for every query of a
    chunk, so a longer context takes shorter chunks)."""
    from ..eval.longctx import memory_estimate

    chunk = 512
    while chunk > 1 and memory_estimate(config, context, batch=1, prefill_chunk=chunk)["prefill_bytes"] > budget_bytes:
        chunk //= 2
    return chunk


def format_report(r: dict) -> str:
    lines = [f"long-context run: {r['context_tokens']:,} tokens, prefill chunk {r['prefill_chunk']}, "
             f"LSA top-{r['index_topk']}, {r['threads']} threads, curve in {r['curve_clock']} time"]
    if "prefill_tokens_per_s" in r:
        lines += [
            f"  prefill               {r['prefill_tokens_per_s']:,.0f} tokens/s ({r['prefill_s']:.0f} s)",
            f"  decode at {r['reference_context']:>9,}   {r['decode_ms_per_token_16k']:.2f} ms/token",
            f"  decode at {r['context_tokens']:>9,}   {r['decode_ms_per_token_at_context']:.2f} ms/token "
            f"({r['decode_ratio']:.2f}x)",
            f"  latent cache          {r['cache_bytes'] / GiB:.3f} GiB for {r['cache_tokens']:,} tokens; planner "
            f"{r['planner_cache_bytes'] / GiB:.3f} GiB ({100 * (r['cache_vs_planner'] - 1):+.2f}%)",
        ]
    for p in r["curve"]:
        lsa = f"{p['lsa_decode_ms']:8.2f}" if p["lsa_decode_ms"] is not None else "       -"
        fid = p.get("lsa_fidelity")
        lines.append(f"  {p['context']:>9,} tokens: decode LSA {lsa} ms  dense {p['dense_decode_ms']:8.2f} ms  cache "
                     f"{p['cache_bytes'] / 2**20:8.1f} MiB" + (f"  fidelity {fid:.1%}" if fid is not None else ""))
    lines.append(f"  peak RSS {r['peak_rss_gib']:.2f} GiB ({r['peak_rss_source']}), wall {r['wall_s']:.0f} s")
    return "\n".join(lines)


__all__ = ["run_longctx_bench", "format_report", "planner_cache_bytes", "decode_step_ms", "lsa_fidelity", "auto_chunk"]


# ---------------------------------------------------------------------------------------------------
# `longcat bench longctx`


def _run_cli(args) -> int:
    import json

    import torch

    from ..config import parse_overrides
    from ..errors import UserError
    from ..eval.longctx import parse_length

    context = parse_length(args.context)
    curve = [parse_length(t) for t in args.curve.split(",") if t.strip()] if args.curve else []
    checks = [
        ("--new-tokens", args.new_tokens >= 2, "must be >= 2 (decode is timed after the first token)"),
        ("--context", context >= 2, "must be >= 2 tokens"),
        ("--prefill-chunk", args.prefill_chunk >= 0, "must be >= 0 (0 = chosen from the context)"),
        ("--decode-steps", args.decode_steps >= 1, "must be >= 1"),
        ("--threads", args.threads is None or args.threads >= 1, "must be >= 1"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            raise UserError(f"{flag} {rule}")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda _: None) if args.json else (lambda line: print(line, flush=True))
    result = run_longctx_bench(
        preset_name=args.preset, context=context, new_tokens=args.new_tokens, curve=curve,
        fidelity_max=0 if args.fidelity_max.strip() == "0" else parse_length(args.fidelity_max), prefill_chunk=args.prefill_chunk,
        decode_steps=args.decode_steps, model_dir=args.model, overrides=parse_overrides(args.set),
        skip_run=args.curve_only, clock=args.clock, log=log,
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def register(bench) -> None:
    p = bench.add_parser(
        "longctx",
        help="prefill a long prompt with LSA, decode at that context; dense vs LSA decode against context",
        description="Prefills --context random tokens through the engine's chunked path (LSA), decodes --new-tokens "
        "greedy tokens there and at 16K, and prints prefill tokens/s, decode ms/token at both, the latent cache "
        "bytes next to the planner's prediction (`longcat plan serve --engine longcat`), peak RSS and wall time. "
        "--curve adds one decode step per length for LSA and dense attention, and LSA's fidelity (the share of "
        "the dense attention mass on the selected tokens) up to --fidelity-max. docs/LONG_CONTEXT.md has the "
        "1M-token command.",
    )
    p.add_argument("--preset", default="tiny", help="model preset with random weights (default tiny: LSA on)")
    p.add_argument("--model", default=None, metavar="DIR", help="a trained model instead of the preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--context", default="64k", help="prompt tokens, e.g. 65536, 64k or 1m (default 64k)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after each prefill (default 64)")
    p.add_argument("--curve", default="1k,4k,16k,64k",
                   help="lengths for the dense-vs-LSA decode curve, up to --context (empty: none)")
    p.add_argument("--fidelity-max", default="16k", help="longest curve length whose LSA fidelity is measured "
                   "(each needs a real prefill of that length; 0 = none)")
    p.add_argument("--decode-steps", type=int, default=5, help="decode steps timed per curve point (median)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="how the curve's decode steps are timed: wall (default) or cpu (this process's CPU time, "
                        "which leaves out waiting for a core on a shared machine; use with --threads 1)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prompt positions per prefill forward (default 0: the largest power of two up to 512 "
                        "whose working set over the context stays within 2 GiB)")
    p.add_argument("--curve-only", action="store_true", help="skip the prefill-and-decode run, measure the curve")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (context_tokens, prefill_tokens_per_s, decode_ms_per_token_16k, "
                        "decode_ms_per_token_at_context, cache_bytes, planner_cache_bytes, peak_rss_gib, peak_rss_source, wall_s, curve, "
                        "curve_clock)")
    p.set_defaults(func=_run_cli)
