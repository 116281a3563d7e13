"""Inference speed, side by side in one run: our engine against transformers' `generate`.

1. Batch-1 greedy decoding, ours vs transformers LongcatFlashForCausalLM.generate on the same
   weights (our model saved in the HF layout), at several prompt lengths. Both sides run in this
   process, interleaved round by round. Decode speed is (new_tokens - 1) / (time for new_tokens
   minus time for one token), so prefill is left out on both sides; medians over the rounds are
   compared, and the outputs must be identical token for token.
2. Batch-N aggregate decode throughput (prompts of different lengths), ours vs transformers
   `generate` on the same batch (left-padded with an attention mask, as transformers expects),
   with the same prefill-free timing and the same token-for-token check.
3. Cache bytes per token: our preallocated latent cache against transformers' cache after the
   same prompt.
4. With a trained model that has MTP heads (`model_dir`, e.g. what `make demo` writes): draft
   acceptance rate and the speed-up of speculative decoding over plain decoding (same output).

The default model is the `small` preset (what `make demo` trains) without the parts transformers
lacks (n-gram embedding, sparse attention, MTP).
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import torch

from ..infer import Engine, SamplingParams
from ..reference import transformers_reference
from ..model import LatentCache, build_model, count_parameters
from .common import Timer, comparable_config, random_prompts

MODES = ("eager", "compiled")

DEMO_PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n\n\ndef ",
    "class Parser:\n    \"\"\"",
    "The function returns",
    "    for i in range(",
    "# Licensed under the",
    "if __name__ == \"__main__\":\n",
    "Return a new list",
]


def gemm_ceiling(model, steps: int, timer: Timer) -> float:
    """Tokens/s of a decode step reduced to its weight GEMMs (batch 1): every matrix a step reads
    (attention, dense FFNs, router, k routed experts per layer, output head), nothing else. No
    eager implementation can beat it: at batch 1 the weights stream from memory once per token."""
    import torch.nn.functional as F

    c = model.config
    device = model.lm_head.weight.device
    mats = []
    for layer in model.layers:
        for attn in layer.self_attn:
            mats += [attn.q_a_proj.weight, attn.q_b_proj.weight, attn.kv_a_proj_with_mqa.weight,
                     attn.kv_b_proj.weight, attn.o_proj.weight]
        for mlp in layer.mlps:
            mats += [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        mats.append(layer.mlp.router.classifier.weight)
    mats.append(model.lm_head.weight)
    inputs = {m.shape[1]: torch.randn(1, m.shape[1], device=device) for m in mats}
    experts = [(layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj) for layer in model.layers]
    k = max(1, round(c.ffn_slots_per_token))  # FFN-expert slots per token (identity slots cost nothing)
    hidden = torch.randn(1, c.hidden_size, device=device)
    act = torch.randn(1, c.expert_ffn_hidden_size, device=device)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for step in range(steps + 2):
            if step == 2:
                t0 = timer()
            for m in mats:
                F.linear(inputs[m.shape[1]], m)
            for gate_up, down in experts:
                for e in torch.randperm(c.n_routed_experts, generator=g)[:k].tolist():
                    F.linear(hidden, gate_up[e])
                    F.linear(act, down[e])
        return steps / (timer() - t0)


def _hf_cache_bytes(reference, prompt, device) -> int:
    with torch.inference_mode():
        out = reference(torch.tensor([prompt], device=device), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed within transformers 5.x
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


def _engines(model, modes, tokenizer=None) -> dict[str, Engine]:
    """One engine per decode path: "eager" is Engine(model), "compiled" is Engine(model, compile=True)."""
    engines = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}; choose from {', '.join(MODES)}")
        engines[mode] = Engine(model, tokenizer, compile=mode == "compiled")
    return engines


def _warm_up(engines: dict[str, Engine], prompts, params, log) -> tuple[dict[str, float], list[str]]:
    """First calls (compilation for the compiled path), timed on the wall clock. The warnings the
    engine gives on the way are logged and returned: they can change what the numbers mean."""
    seconds, notes = {}, []
    for mode, engine in engines.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)  # what the engine says to its user, even if said before
            for group in prompts:
                engine.generate(group, params)
        seconds[mode] = time.perf_counter() - t0
        for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
            notes.append(f"{mode}: {message}")
            log(f"  warning during the {mode} warm-up: {message}")
    if "compiled" in seconds:
        log(f"warm-up: compiling the decode graphs took {seconds['compiled']:.0f} s (wall; cached on disk after)")
    return seconds, notes


def run_infer_bench(
    preset_name: str = "small",
    *,
    prompt_lengths: tuple[int, ...] = (32, 512, 2048),
    new_tokens: int = 64,
    batch: int = 8,
    rounds: int = 3,
    threads: int | None = 1,
    clock: str = "cpu",
    device: torch.device | str = "cpu",
    model_dir: str | None = None,
    speculative: tuple[int, ...] = (1, 2, 3),
    modes: tuple[str, ...] = MODES,
    overrides: dict | None = None,
    draft_vocab: int | None = None,
    log=print,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    if clock == "cpu" and torch.get_num_threads() > 1:
        log("note: the CPU clock adds up every thread's time; with more than one thread use --clock wall")
    device = torch.device(device)
    timer = Timer(clock, device)
    config = comparable_config(preset_name, **(overrides or {}))
    counts = count_parameters(config)
    # built on the CPU and then moved, so every device runs the same weights
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # clear argmax margins, so both sides' greedy outputs agree
    reference = transformers_reference(model, log)
    model.to(device)
    if reference is not None:
        reference.to(device).eval()
    report: dict = {
        "model": {"preset": preset_name, "overrides": overrides or {}, "total_params": counts.total,
                  "active_params": round(counts.active_params)},
        "device": str(device), "threads": torch.get_num_threads(), "clock": clock, "new_tokens": new_tokens,
        "modes": list(modes),
    }
    log(f"model: {preset_name} without n-grams/LSA/MTP, {counts.total / 1e6:.1f}M parameters "
        f"({counts.active_params / 1e6:.1f}M active), fp32 on {device}, {torch.get_num_threads()} thread(s), "
        f"{clock} clock")
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    engines = _engines(model, modes)
    # prompts of the batch section, warmed up too (batch 1 and batch > 1 are separate graphs)
    lengths = [max(1, prompt_lengths[0] + d) for d in range(-(batch // 2), batch - batch // 2)]  # different lengths
    batch_prompts = random_prompts(lengths, config.vocab_size, seed=99)
    report["warmup_s"], report["warnings"] = _warm_up(engines, [batch_prompts[:1], batch_prompts], greedy, log)
    pad_id = 0 if reference is None or reference.generation_config.pad_token_id is None \
        else reference.generation_config.pad_token_id

    def ours_time(engine, group, params):
        t0 = timer()
        ids = [r.token_ids for r in engine.generate(group, params)]
        return timer() - t0, ids

    def theirs_time(group, params):
        """transformers generate on a batch, left-padded: the new tokens of every row start at one column."""
        n, width = params.max_new_tokens, max(map(len, group))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config chatter on every call
            t0 = timer()
            out = reference.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=pad_id)
            return timer() - t0, out[:, width:].tolist()

    def decode_time(run, group):
        """Seconds of decoding alone: a full generation minus a one-token one (its prefill)."""
        t_full, ids = run(group, greedy)
        t_first, _ = run(group, one)
        return t_full - t_first, ids

    def side_by_side(group) -> tuple[dict[str, float], dict[str, list]]:
        """Median decode seconds and the tokens of every side, interleaved round by round (round 0 warms up)."""
        times: dict[str, list[float]] = {name: [] for name in [*engines, "transformers"]}
        outputs: dict[str, list] = {}
        for r in range(rounds + 1):
            for mode, engine in engines.items():
                t, outputs[mode] = decode_time(lambda g, p, e=engine: ours_time(e, g, p), group)
                if r:
                    times[mode].append(t)
            if reference is not None:
                t, outputs["transformers"] = decode_time(theirs_time, group)
                if r:
                    times["transformers"].append(t)
        return {name: statistics.median(ts) for name, ts in times.items() if ts}, outputs

    def compare(row: dict, seconds: dict[str, float], outputs: dict[str, list], tokens: int) -> list[str]:
        parts = []
        for name, s in seconds.items():
            row[f"{name}_tokens_per_s"] = tokens / s
            parts.append(f"{name} {tokens / s:7.1f}")
        if reference is not None:
            theirs = row["transformers_tokens_per_s"]
            for mode in engines:
                row[f"{mode}_speedup"] = row[f"{mode}_tokens_per_s"] / theirs
                row[f"{mode}_identical_output"] = outputs[mode] == outputs["transformers"]
            parts.append("ratio " + ", ".join(f"{m} {row[f'{m}_speedup']:.2f}x" for m in engines))
            parts.append("same tokens: " + ("yes" if all(row[f"{m}_identical_output"] for m in engines) else "NO"))
        return parts

    decoded = new_tokens - 1

    # 1. batch-1 decode against transformers -----------------------------------------------------
    report["batch1"] = []
    for length in prompt_lengths:
        prompt = random_prompts([length], config.vocab_size, seed=length)[0]
        seconds, outputs = side_by_side([prompt])
        row = {"prompt_tokens": length}
        parts = compare(row, seconds, outputs, decoded)
        log(f"batch 1 decode, prompt {length:5d} (tok/s): " + " | ".join(parts))
        report["batch1"].append(row)

    ceiling = gemm_ceiling(model, new_tokens, timer)
    report["gemm_ceiling_tokens_per_s"] = ceiling
    first = report["batch1"][0]
    log(f"batch 1, the weight GEMMs alone: {ceiling:7.1f} tok/s (the bound for an eager implementation; "
        + ", ".join(f"{m} reaches {first[f'{m}_tokens_per_s'] / ceiling:.0%}" for m in engines) + ")")

    # 2. batch-N aggregate against transformers on the same batch ------------------------------------
    seconds, outputs = side_by_side(batch_prompts)
    row = {"batch": batch, "prompt_tokens": lengths}
    parts = compare(row, seconds, outputs, batch * decoded)
    # how batching scales our own decode, against batch 1 at the first prompt length (section 1)
    for mode in engines:
        row[f"{mode}_vs_own_batch1"] = row[f"{mode}_tokens_per_s"] / first[f"{mode}_tokens_per_s"]
    log(f"batch {batch} decode, prompts {min(lengths)}..{max(lengths)} (aggregate tok/s): " + " | ".join(parts))
    log(f"  info: batch {batch} over our batch 1 at prompt {prompt_lengths[0]}: "
        + ", ".join(f"{m} {row[f'{m}_vs_own_batch1']:.2f}x" for m in engines))
    report["batch"] = row

    # 3. cache bytes per token -----------------------------------------------------------------------
    # the engine's own cache as it allocated it for the runs above (nbytes counts the whole allocation)
    cache = next(iter(engines.values())).cache_for(1, 1)
    measured = cache.nbytes() / (cache.allocated_rows * cache.max_len)
    latent = LatentCache.bytes_per_token(config, dtype_bytes=4)
    c = config
    expanded = 2 * c.num_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 4
    cache_row = {"ours_bytes_per_token": measured, "latent_bytes_per_token": latent,
                 "expanded_per_head_bytes_per_token": expanded}
    line = (f"cache bytes/token (fp32): ours {measured:.0f} (latent size {latent}) | a per-head K/V cache would "
            f"hold {expanded} ({expanded / measured:.2f}x)")
    if reference is not None:
        prompt = random_prompts([prompt_lengths[-1]], c.vocab_size)[0]
        theirs = _hf_cache_bytes(reference, prompt, device) / len(prompt)
        cache_row["transformers_bytes_per_token"] = theirs
        line += f" | transformers {theirs:.0f} ({theirs / measured:.2f}x)"
    report["cache"] = cache_row
    log(line)

    # 4. MTP speculative decoding on a trained model --------------------------------------------------
    if model_dir is not None:
        report["speculative"] = run_speculative_bench(model_dir, new_tokens=max(new_tokens, 128), rounds=rounds,
                                                      drafts=speculative, timer=timer, modes=modes, log=log,
                                                      draft_vocab=draft_vocab)
    return report


def speculative_step_costs(engine: Engine, k: int, position: int, timer: Timer, reps: int = 50,
                           draft_vocab: int | None = None) -> dict | None:
    """CPU or device seconds (medians of `reps` calls) of the compiled graphs behind a greedy
    speculative step at batch 1, the newest token at `position`: a plain decode step (one token),
    the verify forward over k+1 tokens, and the fused step (MTP draft chain + that verify +
    acceptance, `DecodeStep.speculate_greedy`); the draft chain costs fused - verify. The inputs are
    arbitrary tokens: the costs do not depend on the values, and the cache the engine keeps for its
    next generation is rewritten by that generation's prefill. None where such a step does not run
    as one graph (the eager engine, sparse attention past index_topk, a long draft window).
    draft_vocab: the drafts' vocabulary (the first N ids; default the engine's)."""
    from ..infer.speculative import MTPDrafter

    runner, model = engine.runner, engine.model
    vocab = engine.draft_vocab if draft_vocab is None else draft_vocab
    drafter = MTPDrafter(model, runner, k, 1, position + k + 2, engine.prefill_chunk, vocab)
    W, H = k + drafter.depths, model.config.hidden_size
    if position < W or not runner.fuses_speculation(1, k, W, position + k + 1):
        return None
    cache = engine.cache_for(1, position + k + 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, W + 1 + drafter.history), generator=g).to(engine.device)
    prev = torch.randn(1, W, H, generator=g).to(engine.device, engine.dtype)
    positions = torch.arange(position - W, position + k + 1, device=engine.device).unsqueeze(0)  # n-W .. n+k
    history = torch.full((1, drafter.history), 5, device=engine.device) if drafter.history else None
    calls = {
        "plain": lambda: runner.forward(ids[:, -1:], positions[:, W : W + 1], cache, history),
        "verify": lambda: runner.forward(ids[:, -k - 1 :], positions[:, W:], cache, history, last_only=False),
        "fused": lambda: runner.speculate_greedy(ids, prev, positions, cache, drafter.depths, k, drafter.history,
                                                 span=position + k + 1, vocab=drafter.vocab),
    }
    seconds = {}
    with torch.inference_mode():
        for name, call in calls.items():
            times = []
            for i in range(reps + 3):  # the first calls compile (where the engine has not) and warm up
                t0 = timer()
                call()
                if i >= 3:
                    times.append(timer() - t0)
            seconds[name] = statistics.median(times)
    seconds["draft"] = seconds["fused"] - seconds["verify"]
    return seconds


def run_speculative_bench(model_dir: str, *, new_tokens: int = 128, rounds: int = 3, drafts=(1, 2, 3),
                          timer: Timer | None = None, modes: tuple[str, ...] = MODES, log=print,
                          draft_vocab: int | None = None) -> dict:
    """Plain greedy decoding vs MTP speculative decoding on a trained model (batch 1, same output),
    per decode path. draft_vocab: draft from the first N token ids (0 = all; None = the engine's
    default for the model's tokenizer, `infer.speculative.default_draft_vocab`)."""
    from ..infer.speculative import check_draft_vocab

    from ..interop.loader import load
    from ..infer.cli import find_tokenizer, load_tokenizer, resolve_model_dir

    timer = timer or Timer("cpu")
    path = resolve_model_dir(model_dir)
    model = load(path, device=timer.device).eval()
    if not model.mtp:
        raise ValueError(f"{path} has no MTP heads (mtp_num_layers = 0): nothing to draft with")
    tok_path = find_tokenizer(path, Path(model_dir))
    tokenizer = load_tokenizer(tok_path) if tok_path is not None else None
    prompts = DEMO_PROMPTS if tokenizer is not None else random_prompts([16] * 4, model.config.vocab_size)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    log(f"speculative decoding on {path} ({count_parameters(model.config).total / 1e6:.1f}M parameters, "
        f"{len(model.mtp)} MTP head(s)), {len(prompts)} prompts, batch 1, greedy, {new_tokens} tokens")
    V = model.config.vocab_size
    out = {"model": str(path), "vocab_size": V}
    for mode, engine in _engines(model, modes, tokenizer).items():
        vocab = engine.draft_vocab if draft_vocab is None else check_draft_vocab(draft_vocab, V)
        out["draft_vocab"] = vocab

        def run(k: int):
            t0 = timer()
            results = [engine.generate([p], params, speculative=k, draft_vocab=vocab)[0] for p in prompts]
            return timer() - t0, results

        plain_t, plain = [], None
        spec_t: dict[int, list[float]] = {k: [] for k in drafts}
        spec: dict[int, list] = {}
        for r in range(rounds + 1):  # round 0 warms up (and compiles)
            t, plain = run(0)
            if r:
                plain_t.append(t)
            for k in drafts:
                t, spec[k] = run(k)
                if r:
                    spec_t[k].append(t)
        total = sum(len(x.token_ids) for x in plain)
        base = total / statistics.median(plain_t)
        section = out[mode] = {"plain_tokens_per_s": base, "drafts": []}
        log(f"  {mode}: plain decoding {base:7.1f} tok/s; drafts from the first {vocab:,} of {V:,} token ids")
        for k in drafts:
            tps = total / statistics.median(spec_t[k])
            drafted = sum(x.num_draft_tokens for x in spec[k])
            accepted = sum(x.num_accepted_tokens for x in spec[k])
            same = [x.token_ids for x in spec[k]] == [x.token_ids for x in plain]
            row = {"draft_tokens": k, "draft_vocab": vocab, "acceptance_rate": accepted / drafted if drafted else 0.0,
                   "tokens_per_step": total / max(1, drafted // k), "tokens_per_s": tps, "speedup": tps / base,
                   "identical_output": same}
            section["drafts"].append(row)
            log(f"  {mode}: {k} draft token(s): acceptance {row['acceptance_rate']:.0%}, {row['tokens_per_step']:.2f} "
                f"tokens per verify step, {tps:7.1f} tok/s, speed-up {row['speedup']:.2f}x, "
                f"same tokens: {'yes' if same else 'NO'}")
            position = max(len(x.prompt_token_ids) for x in plain) + new_tokens // 2  # mid-generation
            costs = None
            if mode == "compiled":
                costs = speculative_step_costs(engine, k, position, timer, draft_vocab=vocab)
            if costs is not None:
                # where a step's time goes, and the speed-up the graphs alone would allow at this acceptance
                cost = {name: costs[name] / costs["plain"] for name in ("verify", "draft", "fused")}
                row["step_cost_vs_plain"] = cost
                row["graph_bound_speedup"] = row["tokens_per_step"] / cost["fused"]
                log(f"    graph costs in plain steps: verify of {k + 1} tokens {cost['verify']:.2f}, draft chain "
                    f"{cost['draft']:.2f}, fused step {cost['fused']:.2f} (plain step {costs['plain'] * 1e3:.2f} ms); "
                    f"at {row['tokens_per_step']:.2f} tokens per step the graphs alone allow "
                    f"{row['graph_bound_speedup']:.2f}x")
    return out


__all__ = ["MODES", "gemm_ceiling", "run_infer_bench", "run_speculative_bench", "speculative_step_costs"]
