"""`longcat plan train|serve|calibrate|validate|hardware`: the cluster planner on the command line."""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from ..config import PRESETS, ConfigError

DEFAULT_SEQ_LEN = 8192
MIN_GLOBAL_BATCH = 1 << 22  # 4Mi tokens

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def count(text: str) -> float:
    """'35e12', '35T', '4Mi', '1,048,576' -> a number."""
    raw = text.strip().replace(",", "").replace("_", "")
    low = raw.lower()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if low.endswith(suffix) and low[: -len(suffix)]:
            try:
                return float(low[: -len(suffix)]) * _SUFFIX[suffix]
            except ValueError:
                break
    try:
        return float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (examples: 35e12, 35T, 4Mi)") from None


def default_global_batch(chips: int, seq_len: int) -> float:
    """4Mi tokens, or one sequence per 8 chips when that is larger."""
    return max(MIN_GLOBAL_BATCH, seq_len * math.ceil(chips / 8))


def register(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan", help="cluster planner: parallel layout, memory, MFU and days for training; chips for serving",
        description="Plan training and serving of any dense or MoE model on any accelerator (DESIGN §5, docs/PLANNER.md).",
    )
    sub = plan.add_subparsers(dest="plan_command", metavar="SUBCOMMAND")

    train = sub.add_parser("train", help="rank parallel layouts for a training run",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Search the valid layouts (or evaluate --layout) and print memory per device, step time, "
                                       "MFU, tokens/day, days, checkpoint cost and failure-aware goodput, with the --parallel string "
                                       "`longcat train` runs for each layout and what the runtime would do differently.")
    _common(train)
    train.add_argument("--chips", type=int, required=True, help="accelerators available")
    train.add_argument("--seq-len", type=lambda s: int(count(s)), default=DEFAULT_SEQ_LEN,
                       help=f"training sequence length (default {DEFAULT_SEQ_LEN})")
    train.add_argument("--global-batch-tokens", type=count, default=None,
                       help="tokens per optimizer step (default: 4Mi tokens, or one sequence per 8 chips if larger)")
    train.add_argument("--tokens", type=count, default=0.0, help="training budget in tokens, e.g. 35e12 or 35T (for days)")
    train.add_argument("--layout", default="", help="fix layout fields, the --parallel names (dp_shard, dp_replicate, ep, tp, cp, "
                       "pp, pp_schedule, pp_microbatches, pp_stages_per_rank) plus the planner's zero (0-3), recompute "
                       "(none|norm_up|selective|full), microbatch (sequences per data rank) and ep_schedule (none|dualbatch|"
                       "shortcut: what hides the expert all-to-all), e.g. dp_shard=64,ep=64,tp=8,pp=4,"
                       "pp_schedule=interleaved,pp_stages_per_rank=2,zero=1,recompute=full; fields left out are searched")
    train.add_argument("--runnable", action="store_true",
                       help="only layouts `longcat train --parallel` runs exactly as planned: zero=3 (FSDP), no "
                            "recomputation, even pipeline stages, tensor parallelism without sequence parallelism")
    train.add_argument("--top", type=int, default=5, help="layouts to list (default 5)")
    train.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    train.add_argument("--precision", choices=("bf16", "fp8", "autocast"), default="bf16",
                       help="bf16: bf16 weights + fp32 master; fp8: fp8 GEMMs, same memory; autocast: fp32 weights (default bf16)")
    train.add_argument("--stack", default="modern", help="software stack: modern (flash attention, sequence parallel, overlapped "
                       "DP reduce, fused kernels), megatron-2021, deepseek-v3 (modern plus FP8 activation caching, bf16 AdamW "
                       "moments, host-side EMA), or pytorch-eager (one plain PyTorch process) (default modern)")
    train.add_argument("--stack-set", action="append", metavar="FIELD=VALUE", help="override a stack field (repeatable)")
    train.set_defaults(func=run_train)

    serve = sub.add_parser("serve", help="weights and KV cache per device; chips for a context length")
    _common(serve)
    serve.add_argument("--chips", type=int, default=0, help="chips in the deployment (default: the fewest that hold --context)")
    serve.add_argument("--tp", type=int, default=0, help="tensor parallel size of the dense part (default: up to 8)")
    serve.add_argument("--ep", type=int, default=0, help="expert parallel size (default: every chip; the result's --parallel "
                       "string needs ep to divide chips/tp, as the runtime takes ep from dp_shard)")
    serve.add_argument("--weights-dtype", choices=("bf16", "fp8"), default="bf16")
    serve.add_argument("--engine", default="sglang", help="serving engine whose memory layout to plan: sglang, vllm or longcat "
                       "(this repository's engine); it decides the KV cache's byte layout per dtype, the indexer and MTP "
                       "caches, page rounding and what --mem-fraction covers (catalog/engines/*.toml; default sglang)")
    serve.add_argument("--kv-dtype", choices=("bf16", "fp16", "fp32", "fp8"), default="bf16",
                       help="KV cache dtype; fp8 is laid out as the engine does it (default bf16)")
    serve.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                       help="the MTP layers draft (speculative decoding) and hold their own cache (default: the engine's "
                            "rule: longcat always, sglang/vllm only when asked)")
    serve.add_argument("--max-running", type=int, default=0, help="requests decoded together, for the decode workspace "
                       "(default: the engine's)")
    serve.add_argument("--prefill-chunk", type=int, default=0, help="tokens per prefill forward, for the prefill workspace "
                       "(default: the engine's chunked-prefill size)")
    serve.add_argument("--mem-fraction", type=float, default=0.0, help="share of device memory the server may use "
                       "(default: the engine's: sglang --mem-fraction-static 0.88, vllm --gpu-memory-utilization 0.9)")
    serve.add_argument("--context", type=lambda s: int(count(s)), default=1 << 20, help="target context in tokens (default 1Mi = 1,048,576)")
    serve.add_argument("--batch", type=int, default=1, help="sequences decoded together, for the decode bound (default 1)")
    serve.set_defaults(func=run_serve)

    cal = sub.add_parser("calibrate", help="measure this machine (GEMM FLOP/s, memory bandwidth) into a hardware entry")
    cal.add_argument("--output", default=None, help="TOML file to write (default: NAME.toml in the user's hardware folder, "
                     "$LONGCAT_CONFIG_DIR/hardware or ~/.config/longcat/hardware, which overrides the packaged entry)")
    cal.add_argument("--name", default="cpu-local")
    cal.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    cal.add_argument("--quick", action="store_true", help="small sizes (a second or two; less accurate)")
    cal.add_argument("--cpu-time", action="store_true", help="time process CPU seconds (needs --threads 1; robust on a busy machine)")
    cal.add_argument("--model", default=None, help="measure GEMM/attention efficiency on this model's shapes (preset, name or file)")
    cal.add_argument("--tokens", type=lambda s: int(count(s)), default=4096, help="tokens per step for --model shapes (default 4096)")
    cal.add_argument("--seq-len", type=lambda s: int(count(s)), default=512, help="sequence length for --model attention (default 512)")
    cal.add_argument("--from", dest="from_report", default=None, metavar="REPORT",
                     help="no measurement: fit an entry to a `longcat bench run` report.json (docs/VALIDATION.md)")
    cal.add_argument("--json", action="store_true")
    cal.set_defaults(func=run_calibrate)

    val = sub.add_parser("validate", help="predicted vs published figures: Megatron-LM 2021 (Table 1) and other published runs",
                         description="Run every validation table (or --file) and print each row's error. Exit status 1 when a "
                                     "Megatron-LM 2021 row is off by more than 15%; the other published runs are reported, not gated.")
    val.add_argument("--file", default=None, help="one validation TOML (default: every packaged table in catalog/validation/)")
    val.add_argument("--no-search", action="store_true", help="skip the planner's own layout per row")
    val.add_argument("--json", action="store_true")
    val.set_defaults(func=run_validate)

    hw = sub.add_parser("hardware", help="list the hardware catalog, or show one entry with each field's source")
    hw.add_argument("name", nargs="?", default=None)
    hw.add_argument("--hw-set", action="append", metavar="FIELD=VALUE")
    hw.add_argument("--json", action="store_true")
    hw.set_defaults(func=run_hardware)

    plan.set_defaults(func=lambda args: (plan.print_help(), 2)[1])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="LongCat preset (flash, flash-lite, longcat2, ...), a planner catalog name "
                   "(gpt3-175b, llama3-405b, deepseek-v3, ...) or a TOML/JSON file")
    p.add_argument("--hardware", required=True, help="catalog name (a100-80gb, h100, h800, h200, h20, b200, ascend-910b, "
                   "ascend-910c, cpu-local) or a FILE.toml")
    p.add_argument("--hw-set", action="append", metavar="FIELD=VALUE", help="override a hardware field (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _load(args):
    from .arch import load_architecture
    from .hardware import load_hardware, parse_assignments

    return load_architecture(args.model), load_hardware(args.hardware, parse_assignments(args.hw_set, "--hw-set"))


# ------------------------------------------------------------------------------------------------------
# train


def run_train(args: argparse.Namespace) -> int:
    from .hardware import load_stack, parse_assignments
    from .layout import parse_layout
    from .layout import Layout
    from .train import Planner, TrainSetup, candidate_layouts, ep_schedule_choices, search

    arch, hw = _load(args)
    stack = load_stack(args.stack, parse_assignments(args.stack_set, "--stack-set"))
    if args.runnable:
        stack.sequence_parallel = False  # the runtime's TP replicates the activations between blocks
    gbt = args.global_batch_tokens or default_global_batch(args.chips, args.seq_len)
    setup = TrainSetup(arch, hw, stack, args.chips, args.seq_len, gbt, args.tokens, args.optimizer, args.precision)
    planner = Planner(setup)
    fixed = parse_layout(args.layout)
    started = time.perf_counter()
    complete = _complete(fixed)
    if complete:
        if fixed.get("pp_schedule") == "interleaved" and "pp_stages_per_rank" not in fixed:
            raise ConfigError("--layout pp_schedule=interleaved needs the virtual stages: pp_stages_per_rank=V")
        plan = None
        # ep_schedule left out: the fastest of what may hide the all-to-all (none under --runnable)
        for ep_schedule in ep_schedule_choices(arch, fixed.get("ep", 1), fixed, args.runnable):
            layout = Layout(**{_LAYOUT_ARGS.get(k, k): v for k, v in {**fixed, "ep_schedule": ep_schedule}.items()})
            problems = planner.check(layout)
            if problems:
                raise ConfigError("invalid --layout: " + "; ".join(problems))
            trial = planner.evaluate(layout)
            if trial is None:
                raise ConfigError(f"--layout cannot split {arch.num_layers} layers into pp={layout.pp} stages with this stack")
            if plan is None or trial.step_time_s < plan.step_time_s:
                plan = trial
        plans = [plan]
    else:
        plans = search(planner, fixed, top=args.top, runnable=args.runnable)
        if not plans:
            candidates = candidate_layouts(planner, fixed, runnable=args.runnable)
            first = candidates[0][0] if candidates else Layout(**{_LAYOUT_ARGS.get(k, k): v for k, v in fixed.items()})
            why = "; ".join(planner.check(first))
            hint = "drop --runnable, or " if args.runnable else ""
            raise ConfigError(f"no valid layout{f' ({why})' if why else ''}: {hint}relax --layout, or change --chips, "
                              "--seq-len or --global-batch-tokens")
    elapsed = time.perf_counter() - started
    if args.json:
        head = {"model": arch.name, "hardware": hw.name, "chips": args.chips, "seq_len": args.seq_len,
                "global_batch_tokens_requested": gbt, "tokens": args.tokens, "stack": stack.name,
                "optimizer": args.optimizer, "precision": args.precision, "search_seconds": elapsed}
        if len(plans) == 1 and complete:
            print(json.dumps({**head, **plans[0].to_dict()}, indent=2))
        else:
            print(json.dumps({**head, "layouts": [p.to_dict() for p in plans]}, indent=2))
        return 0 if plans[0].fits else 1
    _print_train(arch, hw, setup, plans, elapsed, model_flag=f"--preset {args.model} " if args.model in PRESETS else "")
    return 0 if plans[0].fits else 1


# --layout names -> Layout keyword arguments
_LAYOUT_ARGS = {"pp_schedule": "schedule", "pp_stages_per_rank": "vpp"}


def _complete(fixed: dict[str, Any]) -> bool:
    """Whether --layout pins one layout (then it is evaluated as given, not searched)."""
    keys = set(fixed)
    data = "dp" in keys or {"dp_shard", "dp_replicate"} <= keys
    pipeline = fixed.get("pp", 1) == 1 or "pp_schedule" in keys
    return {"tp", "pp", "ep", "cp", "zero", "recompute", "microbatch"} <= keys and data and pipeline


def _console():
    from rich.console import Console

    con = Console()
    # piped or redirected output: wide enough that the layout table keeps one row per layout
    return con if con.is_terminal else Console(width=180)


def _num(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{unit}"
    return f"{x:,.0f}"


def _print_train(arch, hw, setup, plans, elapsed: float, *, model_flag: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    con = _console()
    con.print(f"[bold]{arch.summary()}[/]")
    con.print(f"{setup.chips:,} x {hw.name} ({hw.peak_tflops_bf16:g} TFLOP/s bf16, {hw.hbm_gib:g} GiB), seq {setup.seq_len:,}, "
              f"global batch {setup.global_batch_tokens:,.0f} tokens, {setup.optimizer}, {setup.precision}, stack {setup.stack.name}")
    table = Table(title=f"layouts (searched in {elapsed:.2f} s)" if len(plans) > 1 else "layout")
    for col in ("#", "parallel", "zero", "recompute", "mb", "ep_schedule", "runtime", "fits", "GiB/dev", "step s", "tokens/s",
                "MFU", "days"):
        table.add_column(col, justify="left" if col in ("parallel", "recompute", "ep_schedule", "runtime") else "right",
                         overflow="fold")
    for i, p in enumerate(plans, 1):
        L = p.layout
        table.add_row(str(i), str(L.parallel), str(L.zero), L.recompute, str(L.microbatch),
                      L.ep_schedule if L.ep > 1 else "-", _runtime_word(p.runtime),
                      "yes" if p.fits else "[red]no", f"{p.memory_gib['total']:.1f}", f"{p.step_time_s:.3g}",
                      _num(p.tokens_per_s), f"{p.mfu:.1%}", f"{p.days:.1f}" if p.days else "-")
    con.print(table)
    con.print("runtime: 'as planned' = `longcat train --parallel` runs it as planned, 'differs' = it runs the "
              "parallel string differently (listed for the best), 'no' = it rejects these degrees", highlight=False)
    best = plans[0]
    d = best.to_dict()
    con.print(f"[bold]best: {best.layout}[/]  ({best.chips_used:,} chips used, stages {best.stages})")
    for problem in best.problems:
        con.print(f"[red]{problem}")
    rt = best.runtime
    if rt["parallel"] is None:
        con.print("[red]the runtime cannot run this layout:[/] " + "; ".join(rt["rejected"]), highlight=False, soft_wrap=True)
    else:
        con.print(f"run it: longcat train {model_flag}--nproc {rt['nproc']} --parallel {rt['parallel']} --set train.seq_len={rt['seq_len']} "
                  f"--set train.micro_batch={rt['micro_batch']} --set train.grad_accum={rt['grad_accum']}", highlight=False,
                  soft_wrap=True)
        for note in rt["differs"]:
            con.print(f"  differs from the plan: {note}", highlight=False, soft_wrap=True)
    for note in rt["settings"]:
        con.print(f"  runtime setting: {note}", highlight=False, soft_wrap=True)
    mem = Table(title=f"memory per device, {best.memory_stage} stage (GiB)", show_header=False)
    for k, v in best.memory_gib.items():
        mem.add_row(k, f"{v:,.2f}")
    step = Table(title=f"step time {best.step_time_s:.3f} s, {best.microbatches} micro-batch{'es' if best.microbatches != 1 else ''}", show_header=False)
    for k, v in best.step.items():
        if v:
            step.add_row(k, f"{v:.4f} s", f"{v / best.step_time_s:.1%}")
    con.print(mem)
    con.print(step)
    con.print(f"model TFLOP/s per device {best.tflops_per_device:.1f} (hardware, with recompute: {best.hw_tflops_per_device:.1f}); "
              f"MFU {best.mfu:.1%} causal / {best.mfu_noncausal:.1%} non-causal attention FLOPs, denominator {d['mfu_denominator']}")
    con.print(f"tokens/s {_num(best.tokens_per_s)}, tokens/day {_num(best.tokens_per_day)}, global batch {best.global_batch_tokens:,.0f} tokens")
    if best.days:
        con.print(f"[bold]{setup.tokens:.3g} tokens: {best.days:.1f} days[/] ({d['accelerator_days']:,.0f} accelerator-days); "
                  f"with failures and checkpoints {d['days_with_failures']:.1f} days")
    ck, rel = best.checkpoint, best.reliability
    con.print(f"checkpoint {ck['size_gb']:,.0f} GB (fp32 master + optimizer; weights alone {ck['weights_bf16_gb']:,.0f} GB in bf16), "
              f"written in {ck['write_s']:.0f} s at {ck['write_bandwidth_gbs']:,.0f} GB/s")
    con.print(f"job MTBF {rel['job_mtbf_hours']:.2f} h -> checkpoint every {rel['checkpoint_interval_min']:.0f} min (Young/Daly), "
              f"goodput {rel['goodput']:.1%}" + (f", ~{rel['expected_failures']:.0f} failures over the run" if best.days else ""))


def _runtime_word(runtime: dict[str, Any]) -> str:
    if runtime["parallel"] is None:
        return "no"
    return "as planned" if runtime["runs_as_planned"] else "differs"


# ------------------------------------------------------------------------------------------------------
# serve


def run_serve(args: argparse.Namespace) -> int:
    from .serve import ServeSetup, chips_for_context, serve_plan

    arch, hw = _load(args)
    base = ServeSetup(arch, hw, max(args.chips, 1), args.tp, args.ep, args.weights_dtype, args.kv_dtype, args.mem_fraction,
                      args.batch, args.context, engine=args.engine, mtp=args.mtp, max_running=args.max_running,
                      prefill_chunk=args.prefill_chunk)
    serve_plan(base)  # bad options fail here, before the search for a chip count
    need = chips_for_context(base, args.context)
    need_group = chips_for_context(base, args.context, per_group=True)
    chips = args.chips or need
    if not chips:
        raise ConfigError(f"no deployment up to 2^20 chips holds {args.context:,} tokens; try --kv-dtype fp8 or --weights-dtype fp8")
    base.chips = chips
    out = serve_plan(base)
    out["chips_for_context"] = need
    out["chips_for_context_single_group"] = need_group
    if args.json:
        print(json.dumps(out, indent=2))
        return 0 if out["fits"] else 1
    con = _console()
    con.print(f"[bold]{arch.summary()}[/]")
    con.print(f"{chips:,} x {hw.name}, engine {out['engine']}, tp={out['tp']} (x{out['attention_groups']} attention groups), "
              f"ep={out['ep']}, weights {out['weights_dtype']}, KV {out['kv_dtype']}, {out['mem_fraction']:.0%} of "
              f"{hw.hbm_gib:g} GiB for the engine")
    b = out["weights_breakdown_gib"]
    con.print(f"weights per device {out['weights_gib_per_device']:,.1f} GiB (dense {b['dense']:.1f}, experts {b['experts']:.1f} "
              f"[{out['experts_per_device']} per device], n-gram tables {b['ngram_tables']:.1f}); free for KV {out['free_gib_per_device']:,.1f} GiB")
    ws = out["workspace_gib_per_device"]
    con.print(f"runtime {out['runtime_reserved_gib']:.1f} GiB, activation workspace {ws['total']:.2f} GiB (prefill chunk "
              f"{out['prefill_chunk']:,} tokens {ws['prefill']:.2f}, decode of {out['max_running']} requests {ws['decode']:.2f}) "
              + ("inside" if out["workspace_in_fraction"] else "outside") + " the engine's share")
    for problem in out["problems"]:
        con.print(f"[red]{problem}", highlight=False)
    lay = out["kv_layout_bytes_per_token"]
    parts = ", ".join(f"{k} {v:,.0f}" for k, v in lay.items() if v and k != "total")
    page = f"pages of {out['page_tokens']} tokens" if out["page_tokens"] > 1 else (
        "one max_len row per request" if out["page_tokens"] == 0 else "no page rounding")
    con.print(f"KV cache {out['kv_bytes_per_token']:,.0f} bytes per token per device ({parts}; all "
              f"{arch.num_layers * arch.attn_per_layer} attention sublayers{' + MTP' if out['mtp_cache'] else ''}), {page}")
    con.print(f"max context: {out['max_context_tokens']:,} tokens with the KV sharded over all attention groups; "
              f"{out['max_context_tokens_per_group']:,} in one group")
    if need:
        single = f"{need_group:,} chips if one attention group holds it" if need_group else "no deployment if one group must hold it"
        con.print(f"[bold]{args.context:,}-token context: {need:,} chips[/] with the KV sharded across attention groups; {single}")
    con.print(f"requests of {args.context:,} tokens held at once per attention group: {out['requests_at_context_per_group']:,}")
    if out["parallel"]:
        con.print(f"parallel (--parallel vocabulary): {out['parallel']}", highlight=False)
    else:
        con.print("parallel: none in the runtime's vocabulary: " + "; ".join(out["parallel_rejected"]), highlight=False,
                  soft_wrap=True)
    con.print(f"at {args.context:,} tokens, batch {args.batch}: decode step >= {out['decode_step_lower_bound_s'] * 1e3:.2f} ms "
              f"(<= {out['decode_tokens_per_s_upper_bound']:,.0f} tokens/s), prefill >= {out['prefill_lower_bound_s']:.1f} s "
              f"(bandwidth and peak-FLOP bounds)")
    return 0 if out["fits"] else 1


# ------------------------------------------------------------------------------------------------------
# calibrate, validate, hardware


def run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .calibrate import default_output, measure, to_toml

    if args.from_report:
        from .from_report import run_from_report

        return run_from_report(args)
    arch = None
    if args.model:
        from .arch import load_architecture

        arch = load_architecture(args.model)
    if args.cpu_time and args.threads != 1:
        raise ConfigError("--cpu-time needs --threads 1 (CPU seconds add up across threads)")
    measured = measure(quick=args.quick, threads=args.threads, arch=arch, tokens=args.tokens, seq_len=args.seq_len,
                       cpu_time=args.cpu_time)
    path = Path(args.output) if args.output else default_output(args.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(measured, args.name))
    if args.json:
        print(json.dumps({**measured, "path": str(path)}, indent=2))
    else:
        print(f"bf16 matmul {measured['peak_tflops_bf16'] * 1e3:,.0f} GFLOP/s (fp32 {measured['peak_tflops_fp32'] * 1e3:,.0f}), "
              f"transformer-shaped GEMMs at {measured['gemm_efficiency']:.0%} of it"
              + (f", expert grouped GEMMs {measured['expert_gemm_efficiency']:.0%}" if "expert_gemm_efficiency" in measured else "")
              + f", attention {measured['attention_efficiency']:.0%}, "
              f"memory {measured['hbm_bandwidth_gbs']:.1f} GB/s, {measured['kernel_overhead_us']:.1f} us per eager op, "
              f"{measured['threads']} threads")
        print(f"runtime {measured['reserved_gib']:.2f} GiB resident before any tensor, GEMM library cache up to "
              f"{measured['library_cache_gib']:.2f} GiB, malloc keeps {measured['allocator_retention']:.0%} of the live "
              f"tensors on top of them at a step's peak")
        print(f"wrote {path} (use --hardware {args.name if not args.output else path})")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from .validate import validation_tables

    tables = validation_tables(args.file, free_search=not args.no_search)
    if args.json:
        print(json.dumps({path.name: rows for path, _, rows in tables}, indent=2))
    else:
        print("\n\n".join(f"## {path.name}\n\n" + (_validation_markdown(rows) if kind == "megatron" else _published_markdown(rows))
                          for path, kind, rows in tables))
    return 0 if all(abs(r["error"]) <= 0.15 for _, kind, rows in tables if kind == "megatron" for r in rows) else 1


def _published_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | metric | published | predicted | error | fits | layout evaluated | planner's own pick |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v: f"{v:.1%}") if r["metric"] == "mfu" else (lambda v: f"{v:,.4g}")
        own = f"`{r['own_layout']}` ({r['own_speedup']:.2f}x tokens/s)" if "own_layout" in r else "-"
        lines.append(f"| {r['name']} | {r['metric']} | {fmt(r['published'])} | {fmt(r['predicted'])} | {r['error']:+.1%} | "
                     f"{'yes' if r['fits'] else 'no'} ({r['memory_gib']:.0f} GiB) | `{r['layout']}` | {own} |")
    errs = [abs(r["error"]) for r in rows]
    if errs:
        lines.append(f"\nmean |error| {sum(errs) / len(errs):.1%}, max |error| {max(errs):.1%} over {len(rows)} rows")
    lines += [f"- {r['name']}: {r['source']}" for r in rows]
    return "\n".join(lines)


def _validation_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | GPUs | t | p | batch | published TFLOP/s | predicted | error | layout evaluated | planner's own pick | own pick vs published layout |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        own = f"{r['own_speedup']:.2f}x tokens/s" if "own_speedup" in r else "-"
        lines.append(f"| {r['params_b']}B | {r['gpus']} | {r['tp']} | {r['pp']} | {r['global_batch']} | {r['published_tflops']} | "
                     f"{r['predicted_tflops']:.1f} | {r['error']:+.1%} | `{r['layout']}` | `{r.get('own_layout', '-')}` | {own} |")
    errs = [abs(r["error"]) for r in rows]
    lines.append(f"\nmean |error| {sum(errs) / len(errs):.1%}, max |error| {max(errs):.1%} over {len(rows)} rows")
    return "\n".join(lines)


def run_hardware(args: argparse.Namespace) -> int:
    from .hardware import hardware_names, load_hardware, parse_assignments

    if not args.name:
        names = hardware_names()
        if args.json:
            print(json.dumps(names))
        else:
            for n in names:
                hw = load_hardware(n)
                print(f"{n:14s} {hw.peak_tflops_bf16:7g} TFLOP/s bf16  {hw.hbm_gib:6g} GiB  {hw.hbm_bandwidth_gbs:6g} GB/s  {hw.description}")
        return 0
    hw = load_hardware(args.name, parse_assignments(args.hw_set, "--hw-set"))
    if args.json:
        print(json.dumps(hw.to_dict(), indent=2))
        return 0
    print(f"{hw.name}: {hw.description}")
    for name, value, source, note in hw.fields_table():
        print(f"  {name:28s} {value:>10g}  {source:9s} {note}")
    return 0


__all__ = ["register", "count", "default_global_batch"]
