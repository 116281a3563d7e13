"""`longcat bench ...`: `model` and `infer` measure ours against transformers in the same run and print
the ratio; `plan` sets the planner's prediction against a real training run on this machine."""

from __future__ import annotations

import argparse
import json
import sys


def _check(checks: list[tuple[str, bool, str]]) -> None:
    """Every bad argument refused before a benchmark starts (they run for minutes)."""
    from ..errors import UserError

    for flag, ok, rule in checks:
        if not ok:
            raise UserError(f"{flag} {rule}")


def _device(args: argparse.Namespace):
    """--device checked before anything is built; --clock cpu refused where it cannot see the work."""
    from ..devices import resolve_device

    device = resolve_device(args.device, setting="--device")
    _check([("--clock cpu", args.clock != "cpu" or device.type == "cpu",
             f"counts this process's CPU seconds, not the time {device.type} spends working; use --clock wall "
             f"with --device {args.device}")])
    return device


def run_profile(args: argparse.Namespace) -> int:
    """`bench model --profile`: the demo's training step split by part."""
    from ..errors import UserError
    from ..train.cli import demo_run_config
    from .step_profile import format_profile, profile_train_step

    overrides = [f"model.{item}" for item in args.set]
    if args.batch is not None:
        overrides.append(f"train.micro_batch={args.batch}")
    if args.seq_len is not None:
        overrides.append(f"train.seq_len={args.seq_len}")
    if args.precision is not None:
        if len(args.precision) != 1:
            raise UserError(f"--precision: --profile measures one precision, got {' '.join(args.precision)}")
        overrides.append("train.precision=" + {"fp32": "fp32", "bf16-autocast": "bf16"}[args.precision[0]])
    values = {"device": args.device, "optimizer": args.optimizer}
    if args.threads:
        values["threads"] = args.threads
    run = demo_run_config(overrides, preset_name=args.preset, **values)
    profile = profile_train_step(run, steps=args.rounds, warmup=args.warmup,
                                 log=(lambda *_: None) if args.json else print)
    print(json.dumps(profile.to_dict(), indent=2) if args.json else format_profile(profile))
    return 0


def run_model(args: argparse.Namespace) -> int:
    from ..config import parse_overrides
    from .model_bench import run_model_bench

    if args.profile:
        return run_profile(args)
    args.batch = 8 if args.batch is None else args.batch
    args.seq_len = 256 if args.seq_len is None else args.seq_len
    args.precision = args.precision or ["fp32", "bf16-autocast"]
    _check([
        ("--batch", args.batch >= 1, f"must be >= 1, got {args.batch}"),
        ("--seq-len", args.seq_len >= 1, f"must be >= 1, got {args.seq_len}"),
        ("--rounds", args.rounds >= 1, f"must be >= 1, got {args.rounds}"),
        ("--warmup", args.warmup >= 0, f"must be >= 0, got {args.warmup}"),
        ("--threads", args.threads is None or args.threads >= 1, f"must be >= 1, got {args.threads}"),
    ])
    device = _device(args)

    results = run_model_bench(
        args.preset,
        batch=args.batch,
        seq_len=args.seq_len,
        rounds=args.rounds,
        warmup=args.warmup,
        precisions=tuple(args.precision),
        with_reference=not args.no_reference,
        threads=args.threads,
        clock=args.clock,
        device=device,
        overrides=parse_overrides(args.set),
        log=(lambda *_: None) if args.json else print,
    )
    if args.json:
        print(json.dumps([
            {
                "preset": args.preset, "overrides": args.set, "device": str(device), "clock": args.clock,
                "precision": r.precision, "tokens_per_step": r.tokens_per_step,
                "ours_tokens_per_s": r.ours_tokens_per_s, "transformers_tokens_per_s": r.reference_tokens_per_s,
                "speedup": r.speedup,
            }
            for r in results
        ], indent=2))
    return 0


def run_infer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import parse_overrides
    from .infer_bench import run_infer_bench

    _check([
        ("--prompt-lengths", all(n >= 1 for n in args.prompt_lengths), f"must all be >= 1, got {args.prompt_lengths}"),
        ("--new-tokens", args.new_tokens >= 2,
         f"must be >= 2 (decode speed is timed after the first token), got {args.new_tokens}"),
        ("--batch", args.batch >= 1, f"must be >= 1, got {args.batch}"),
        ("--rounds", args.rounds >= 1, f"must be >= 1, got {args.rounds}"),
        ("--threads", args.threads >= 1, f"must be >= 1, got {args.threads}"),
        ("--speculative", all(k >= 1 for k in args.speculative), f"draft counts must be >= 1, got {args.speculative}"),
        ("--draft-vocab", args.draft_vocab is None or args.draft_vocab >= 0,
         f"must be >= 0 token ids (0 = the full vocabulary), got {args.draft_vocab}"),
    ])
    device = _device(args)
    if args.model is None and Path("runs/demo").is_dir():
        args.model = "runs/demo"
    if args.model is not None:  # the speculative section comes last: a bad model fails now, not minutes later
        from ..errors import UserError
        from ..config import load_config
        from ..infer.cli import resolve_model_dir

        model_dir = resolve_model_dir(args.model)
        model_config = load_config(model_dir)
        if model_config.mtp_num_layers == 0:
            raise UserError(f"--model {args.model}: {model_dir} has no MTP heads (mtp_num_layers = 0), so there is "
                              "nothing to draft with; give a model trained with MTP (make demo writes one)")
        if args.draft_vocab is not None and args.draft_vocab > model_config.vocab_size:
            raise UserError(f"--draft-vocab {args.draft_vocab}: the model has {model_config.vocab_size} token ids; "
                            "give at most that many (0 = all)")
    report = run_infer_bench(
        args.preset, prompt_lengths=tuple(args.prompt_lengths), new_tokens=args.new_tokens, batch=args.batch,
        rounds=args.rounds, threads=args.threads, clock=args.clock, device=device, model_dir=args.model,
        speculative=tuple(args.speculative), modes=tuple(args.modes), overrides=parse_overrides(args.set),
        draft_vocab=args.draft_vocab, log=(lambda *_: None) if args.json else print,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _register_infer(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "infer",
        help="decode tokens/s vs transformers generate at batch 1 and batch 8, cache bytes, MTP speculation",
        description="Inference speed, ours vs transformers `generate` on the same weights, side by side in one run: "
        "batch-1 decode at several prompt lengths, the aggregate decode speed of a batch (--batch, prompts of "
        "different lengths) against transformers on the same batch, cache bytes per token, and with --model the "
        "MTP draft acceptance and speculative speed-up. Every section is run for each decode path (--modes).",
    )
    p.add_argument("--preset", default="small", help="model preset (n-grams/LSA/MTP off: transformers lacks them)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 512, 2048])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="sequences of the batched section, ours and transformers alike")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (median reported), after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="process CPU time (robust on a shared machine with 1 thread; CPU only) or wall time")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, xpu, npu, ... or auto (default cpu)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a trained model with MTP heads for the speculative-decoding section "
                        "(default: runs/demo when `make demo` has written it)")
    p.add_argument("--speculative", type=int, nargs="+", default=[1, 2, 3], help="draft counts to measure")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="speculative section: draft from the first N token ids (0 = the full vocabulary; default: "
                        "the engine's choice for the model's tokenizer, as `longcat generate` makes it)")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                   help="decode paths to measure: eager (Engine(model)) and compiled (Engine(model, compile=True))")
    p.add_argument("--json", action="store_true", help="print the results as JSON (no progress lines)")
    p.set_defaults(func=run_infer)


def run_plan(args: argparse.Namespace) -> int:
    from ..config import preset
    from .plan_bench import PlanSetup, format_report, run_plan_bench

    _check([
        ("--seq-len", args.seq_len >= 1, f"must be >= 1, got {args.seq_len}"),
        ("--micro-batch", args.micro_batch >= 1, f"must be >= 1, got {args.micro_batch}"),
        ("--steps", args.steps >= 1, f"must be >= 1, got {args.steps}"),
        ("--warmup", args.warmup >= 0, f"must be >= 0, got {args.warmup}"),
        ("--threads", args.threads >= 1, f"must be >= 1, got {args.threads}"),
        ("--clock cpu", args.clock != "cpu" or args.threads == 1,
         f"adds up the CPU seconds of every thread; use --threads 1, or --clock wall with --threads {args.threads}"),
        ("--output", args.output is None or args.hardware is None,
         "is where a calibration writes; with --hardware nothing is calibrated, so give one or the other"),
    ])
    preset(args.preset)  # an unknown preset fails now, not after the calibration
    setup = PlanSetup(args.preset, args.seq_len, args.micro_batch, args.threads, args.clock)
    result = run_plan_bench(setup, steps=args.steps, warmup=args.warmup, hardware=args.hardware, output=args.output,
                            quick=args.quick, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _register_plan(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "plan",
        help="the planner's step time and peak memory vs a real training run on this machine",
        description="Calibrate this machine on a training configuration's own shapes (as `longcat plan calibrate "
        "--model PRESET` does, written to the catalog's cpu-local entry unless --output or --hardware says "
        "otherwise), ask the planner for that configuration on one chip, then train it for real in a child process "
        "and print predicted vs measured step time and peak memory with the error. The default is what `make demo` "
        "trains (small, 256 x 16, bf16 autocast), with AdamW. Other jobs on the same cores slow the training and "
        "the calibration alike but not necessarily equally: the default one thread and CPU clock resist that.",
    )
    p.add_argument("--preset", default="small", help="model preset to train (default small, the demo's)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256, the demo's)")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per step (default 16, the demo's)")
    p.add_argument("--steps", type=int, default=10, help="measured training steps (mean reported)")
    p.add_argument("--warmup", type=int, default=2, help="training steps before the measured ones")
    p.add_argument("--hardware", default=None, metavar="NAME|FILE",
                   help="use this hardware entry (e.g. cpu-local from an earlier run) instead of calibrating now")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="where the calibration writes (default: the catalog's cpu-local entry, which "
                        "--hardware cpu-local reads)")
    p.add_argument("--quick", action="store_true", help="calibrate with small sizes (seconds; less accurate)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for calibration and training (default 1)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: the process's CPU seconds (needs --threads 1; robust on a shared machine); wall: elapsed")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run_plan)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: ours vs transformers in the same run; the planner vs a real run")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    m = bench.add_parser(
        "model",
        help="forward+backward tokens/s of our model vs transformers' LongcatFlash, same weights",
        description="Train-step throughput (forward + backward) of a preset, ours vs transformers "
        "LongcatFlashForCausalLM on the same weights, interleaved round by round; prints tokens/s and the ratio.",
    )
    m.add_argument("--preset", default="small", help="model preset (n-grams/LSA/MTP are switched off: transformers lacks them)")
    m.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --profile: the demo's)")
    m.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; --profile: the demo's)")
    m.add_argument("--rounds", type=int, default=6, help="measured rounds per precision (median is reported)")
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16-autocast"],
                   help="default: both; --profile: the demo's (bf16 autocast where the CPU has bf16)")
    m.add_argument("--profile", action="store_true",
                   help="instead of the comparison: the demo's training step (`longcat demo`'s batch and optimizer, "
                        "on --preset with its --set overrides) "
                        "split by part (attention, router, expert GEMMs, dispatch/combine, dense FFNs, norms, "
                        "embeddings, LM head + loss, optimizer, data), each with its share of the step and its "
                        "achieved FLOP/s or bytes/s against this machine's measured peaks")
    m.add_argument("--optimizer", choices=["adamw", "muon"], default="muon", help="--profile: the step's optimizer")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    m.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: process CPU time, robust when other work shares the machine (use with --threads 1; "
        "CPU only)",
    )
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, xpu, npu, ... or auto (default cpu)")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    m.add_argument("--no-reference", action="store_true", help="measure ours only")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_model)
    _register_infer(bench)
    _register_plan(bench)
    # `bench serve` (load generator against any OpenAI-compatible URL)
    from .serve_load import register as register_serve

    register_serve(bench)
    # the validation toolkit: `bench run|oom|numerics|compare`
    from .toolkit_cli import register as register_toolkit

    register_toolkit(bench)
    # `bench longctx`: long-context prefill and decode with LSA (longctx_bench.py)
    from .longctx_bench import register as _register_longctx

    _register_longctx(bench)
    # `bench memory`: per-rank peak memory of sharded construction on 1, 2, 4 ranks (memory_bench.py)
    from .memory_bench import register as _register_memory

    _register_memory(bench)
