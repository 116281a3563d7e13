"""`longcat train` and `longcat demo`."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ..config import PRESETS, ConfigError, describe_fields
from .config import RunConfig, build_run_config, describe_train_fields

# What `make demo` runs: the `small` preset on the embedded corpus for about six minutes.
DEMO_TIME_BUDGET = 360.0
DEMO_THREADS = 2
DEMO_SEQ_LEN = 256
DEMO_MICRO_BATCH = 16
DEMO_VOCAB = 8192
DEMO_MAX_BYTES = 12 * 2**20  # corpus bytes tokenized: more than six minutes of training can read
DEMO_TOKENIZER_BYTES = 8 * 2**20
# Chosen by measurement: the small preset, seq_len 256, micro-batch 16, 120 steps (about what the
# demo budget reaches), held-out loss (nats/token) at step 120: AdamW lr 3e-3 5.323, AdamW 6e-3
# 5.434, Muon 3e-3 5.346, Muon 6e-3 5.214. Muon's extra optimizer time is ~8% of a step, less than
# its lead is worth in steps.
DEMO_OPTIMIZER = "muon"
DEMO_LR = 6e-3
DEMO_WARMUP_STEPS = 30
# The corpus is mostly Python source: the demo shows what it learnt from a code prompt. The prompt
# ends where a token ends in the training text (a trailing newline would be a token the model only
# saw before unindented text: BPE merges a newline with the indentation that follows it).
DEMO_SAMPLE_PROMPT = "class Parser:\n    def __init__(self, text):"
DEMO_SAMPLE_TOKENS = 100
DEMO_SAMPLE_TEMPERATURE = 0.7
DEMO_MARKER = ".longcat-demo"


def _user_error(exc: Exception):
    from ..errors import UserError

    return UserError(str(exc))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.FIELD=VALUE",
                   help="override a config field, e.g. --set model.hidden_size=128 --set train.lr=1e-3 "
                        "(repeatable; a bare FIELD works when it names one field)")
    p.add_argument("--seed", type=int, default=None, help="seed for weights, data order and samples")
    p.add_argument("--threads", type=int, default=None, help="torch threads (exact resume needs the same value)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU (default: measured with a GEMM benchmark at start)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a live progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (tokenizer, token cache, checkpoints, metrics)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LongCat model. Config layers, lowest first: preset (or the resumed run's "
                    "config), --config TOML ([model] and [train] tables), --set overrides, then the flags below.",
        epilog="model fields:\n" + "\n".join("  model." + line.strip() for line in describe_fields().splitlines())
               + "\ntrain fields:\n" + describe_train_fields(),
    )
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="model preset (default: small)")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="run config with [model] and [train] tables")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text/jsonl/parquet file or folder (default: the embedded corpus)")
    p.add_argument("--text-field", default=None, help="jsonl/parquet field holding the text (default: text)")
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="tokenizer.json to use (default: train one)")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of the corpus")
    p.add_argument("--out", default="runs/train", metavar="DIR", help="output directory (default: runs/train)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (an upper bound with --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop after this much training time, with the LR decay fitted to it, and save")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this node: N > 1 re-runs this command under torchrun (see docs/PARALLEL.md)")
    p.add_argument("--parallel", default=None, metavar="LAYOUT",
                   help="parallel layout, e.g. dp_shard=2,ep=2 (default with --nproc N: dp_shard=N); AdamW only")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the group after a rank dies")
    p.add_argument("--stage", choices=["finetune", "yarn", "indexer-warmup", "sparse"], default=None,
                   help="a stage starting from --init-from's weights (a new run in --out): finetune continues "
                        "training as is (the default with --init-from); the context-extension stages: yarn "
                        "extends RoPE, indexer-warmup trains only the LSA indexers under dense attention, sparse "
                        "trains everything with LSA on (docs/LONG_CONTEXT.md); also a [stage] table")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="the run, checkpoint or model directory (ours, Hugging Face, published BF16/FP8) whose "
                        "weights, model config, recipe and tokenizer the run starts from; with --nproc each rank "
                        "reads only its shard")
    p.add_argument("--yarn-factor", type=float, default=None, metavar="F",
                   help="with --stage yarn: grow the context F-fold from the positions the checkpoint was "
                        "trained for (its yarn_original_max_position_embeddings, or max_position_embeddings)")
    _add_common(p)
    p.set_defaults(func=run_train)

    d = subparsers.add_parser(
        "demo", help="train a tokenizer and the small model on the embedded corpus (a 6-minute training budget by default)",
        description="The whole pipeline in one command: BPE tokenizer (8192) on the embedded corpus, token "
                    "cache, the `small` preset trained for a time budget, held-out bits per byte against a "
                    "unigram baseline, and a sample.",
    )
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default: runs/demo)")
    d.add_argument("--time-budget", type=float, default=DEMO_TIME_BUDGET, metavar="SECONDS",
                   help=f"training time (default {DEMO_TIME_BUDGET:.0f})")
    d.add_argument("--optimizer", choices=["adamw", "muon"], default=DEMO_OPTIMIZER)
    d.add_argument("--max-bytes", type=int, default=DEMO_MAX_BYTES, help="corpus bytes to tokenize")
    _add_common(d)
    d.set_defaults(func=run_demo)


# ---------------------------------------------------------------------------------------------------


def _train_values(args: argparse.Namespace) -> dict:
    values = {
        "data": getattr(args, "data", None),
        "text_field": getattr(args, "text_field", None),
        "tokenizer": getattr(args, "tokenizer", None),
        "max_bytes": getattr(args, "max_bytes", None),
        "steps": getattr(args, "steps", None),
        "time_budget": getattr(args, "time_budget", None),
        "seed": args.seed,
        "threads": args.threads,
        "peak_tflops": args.peak_tflops,
    }
    if args.no_progress:
        values["progress"] = False
    return values


def _with_data_errors(fn):
    """Data, checkpoint and divergence problems reach the user as one line."""
    from ..data import DataError
    from .trainer import TrainingError

    try:
        return fn()
    except (DataError, TrainingError) as exc:
        raise _user_error(exc) from None
    except OSError as exc:
        raise _user_error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else exc) from None


def run_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .run import saved_run_config, train_run

    console = Console(stderr=True, soft_wrap=True)
    out = Path(args.out)
    base = None
    if args.resume:
        try:
            base = saved_run_config(out)
        except ConfigError as exc:
            raise ConfigError(f"--resume: {exc}") from None
        if base is None:
            raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'}; start without --resume")
    if args.config and not Path(args.config).is_file():
        raise ConfigError(f"--config: file not found: {args.config}")
    if args.data is not None and not Path(args.data).exists():
        raise ConfigError(f"--data: path not found: {args.data}")
    run = _stage_run_config(args)
    if run is None:
        run = build_run_config(preset_name=args.preset, config_file=args.config, overrides=args.overrides,
                               train_values=_train_values(args), base=base)
    if getattr(args, "nproc", 1) > 1 or getattr(args, "parallel", None) or _under_torchrun():
        return _run_train_parallel(args, run, out, console)
    result, trainer, _ = _with_data_errors(lambda: train_run(run, out, resume=args.resume, console=console))
    _print_summary(console, result, trainer)
    return 0


def _stage_run_config(args: argparse.Namespace) -> RunConfig | None:
    """The run config of a --stage / [stage] run (None for plain training; `--resume` alone reads the
    saved config, which holds the stage)."""
    from .stages import read_stage_table, stage_run_config

    table = read_stage_table(args.config)
    kind = args.stage or table.get("kind")
    if kind is None:
        if args.yarn_factor is not None:
            raise ConfigError("--yarn-factor belongs to the yarn stage; add --stage yarn --init-from RUN_DIR")
        if not args.init_from:
            return None
        kind = "finetune"
    if args.preset:
        raise ConfigError("--preset does not apply with --init-from: the model comes from the directory it names")
    return stage_run_config(kind=kind, init_from=args.init_from, config_file=args.config, overrides=args.overrides,
                            train_values=_train_values(args), yarn_factor=args.yarn_factor, table=table)


def _under_torchrun() -> bool:
    from ..parallel.launch import is_torchrun_worker

    return is_torchrun_worker()


def _run_train_parallel(args: argparse.Namespace, run: RunConfig, out: Path, console) -> int:
    """`--nproc N` / `--parallel`: validate, then relaunch under torchrun; in a worker, train."""
    import sys

    from ..parallel.launch import is_torchrun_worker, run_under_torchrun
    from ..parallel.layout import shutdown_distributed
    from .distributed import check_parallel_run, train_distributed

    if not is_torchrun_worker():
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        check_parallel_run(run, args.parallel, args.nproc)  # impossible layouts fail here, before any process
        argv = sys.argv[1:]
        if argv[:1] != ["train"]:  # started as `python -m longcat.train ...`
            argv = ["train", *argv]
        code = run_under_torchrun(argv, nproc=args.nproc, max_restarts=args.max_restarts)
        if code != 0:
            console.print(f"longcat train: the distributed run failed (exit {code}); see the rank output above",
                          highlight=False, markup=False)
            return 1
        return 0
    try:
        result = _with_data_errors(lambda: train_distributed(run, out, layout_text=args.parallel,
                                                             resume=args.resume, console=console))
    except BaseException:
        # no barrier: other ranks may be stuck in a collective; torchrun stops (or restarts) the group
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    import torch.distributed as dist

    if dist.get_rank() == 0:
        _print_summary(console, result, None)
    shutdown_distributed()
    return 0


def _print_summary(console, result, trainer) -> None:
    lines = [f"trained to step {result.step} ({result.tokens_seen:,} tokens, stopped by {result.stopped.replace('_', ' ')})"]
    if result.bpb is not None:
        lines.append(f"held-out loss {result.eval_loss:.4f} nats/token, {result.bpb:.4f} bits/byte")
    lines.append(f"throughput {result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%} "
                 f"of {result.mfu_peak_flops / 1e9:,.0f} GFLOP/s ({result.mfu_peak_source})")
    if result.skipped_steps:
        lines.append(f"skipped {result.skipped_steps} non-finite step(s)")
    if result.sample:
        lines.append(f"sample: {result.sample!r}")
    lines.append(f"checkpoint: {result.checkpoint}")
    lines.append(f"metrics:    {result.metrics}")
    lines.append(f"loss curve: {result.plot}" if result.plot else f"loss curve: {result.plot_note}")
    for line in lines:
        console.print(line, highlight=False, markup=False)


# ---------------------------------------------------------------------------------------------------


def _prepare_demo_dir(out: Path) -> None:
    """A previous demo run in OUT is replaced (its token cache is kept); anything else is refused."""
    if not out.exists():
        out.mkdir(parents=True)
    elif any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise ConfigError(f"{out} exists and is not a demo directory; choose another --out or remove it")
        for child in out.iterdir():
            if child.name in ("cache", DEMO_MARKER):
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (out / DEMO_MARKER).write_text("written by `longcat demo`; the next demo run replaces this directory\n")


def demo_run_config(overrides: list[str] | tuple[str, ...] = (), *, preset_name: str = "small",
                    **train_values) -> RunConfig:
    """What `longcat demo` trains: the small preset (or `preset_name`) with the demo's defaults,
    then `overrides` (`model.FIELD=V` / `train.FIELD=V`), then `train_values` (the demo's flags)."""
    defaults = dict(steps=1_000_000, seq_len=DEMO_SEQ_LEN, micro_batch=DEMO_MICRO_BATCH, precision="auto",
                    lr=DEMO_LR, warmup_steps=DEMO_WARMUP_STEPS, eval_every=0, eval_batches=16, checkpoint_every=0,
                    sample_prompt=DEMO_SAMPLE_PROMPT, sample_tokens=DEMO_SAMPLE_TOKENS,
                    sample_temperature=DEMO_SAMPLE_TEMPERATURE)
    train_values = {"optimizer": DEMO_OPTIMIZER, "threads": DEMO_THREADS, "time_budget": DEMO_TIME_BUDGET,
                    **train_values}
    return build_run_config(
        preset_name=preset_name,
        overrides=[f"model.vocab_size={DEMO_VOCAB}", *overrides],
        train_values=train_values,
        train_defaults=defaults,
    )


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..data import Tokenizer, iter_documents, train_tokenizer
    from .run import build_trainer, prepare_data, unigram_bpb, unigram_heldout_bpb, with_tokenizer_ids

    console = Console(stderr=True, soft_wrap=True)
    wall0 = time.perf_counter()
    out = Path(args.out)
    threads = args.threads or DEMO_THREADS
    run = demo_run_config(args.overrides, time_budget=args.time_budget, optimizer=args.optimizer, threads=threads,
                          seed=args.seed, peak_tflops=args.peak_tflops, max_bytes=args.max_bytes,
                          **({"progress": False} if args.no_progress else {}))
    _prepare_demo_dir(out)
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    tok_path = cache / f"tokenizer-{DEMO_VOCAB}.json"

    def prepare():
        if tok_path.exists():
            tokenizer = Tokenizer.load(tok_path)
            console.print(f"[1/4] tokenizer: reusing {tok_path}", highlight=False)
        else:
            t0 = time.perf_counter()
            docs = iter_documents(None, split="train", max_bytes=min(DEMO_TOKENIZER_BYTES, args.max_bytes))
            tokenizer = train_tokenizer(docs, vocab_size=DEMO_VOCAB, show_progress=run.train.progress)
            tokenizer.save(tok_path)
            console.print(f"[1/4] tokenizer: {tokenizer.vocab_size}-token byte-level BPE trained on "
                          f"{min(DEMO_TOKENIZER_BYTES, args.max_bytes) / 2**20:.0f} MiB of the embedded corpus "
                          f"in {time.perf_counter() - t0:.1f} s", highlight=False)
        local = RunConfig(run.model, run.train.replace(tokenizer=str(tok_path)))
        t0 = time.perf_counter()
        data = prepare_data(local, out, resume=False, console=console)
        console.print(f"[2/4] tokens: {len(data.store.train):,} train / {len(data.store.heldout):,} held-out "
                      f"({data.store.train_bytes / 2**20:.1f} MiB + {data.store.heldout_bytes / 2**20:.2f} MiB "
                      f"of text) in {time.perf_counter() - t0:.1f} s", highlight=False)
        return local, data

    local, data = _with_data_errors(prepare)
    local = with_tokenizer_ids(local, data.tokenizer)
    store = data.store
    baseline = unigram_bpb(store.train, store.train_bytes, local.model.vocab_size)
    baseline_heldout = unigram_heldout_bpb(store.train, store.heldout, store.heldout_bytes, local.model.vocab_size)
    console.print(f"[3/4] training the small preset ({local.train.optimizer}, {threads} threads, "
                  f"seq_len {local.train.seq_len}, micro-batch {local.train.micro_batch}) for "
                  f"{local.train.time_budget:.0f} s", highlight=False)
    trainer = _with_data_errors(lambda: build_trainer(local, out, data, resume=False, console=console))
    result = _with_data_errors(trainer.train)
    console.print("[4/4] done", highlight=False)

    print()
    print(f"sample (temperature {local.train.sample_temperature}):")
    print("  " + (result.sample or "").replace("\n", "\n  "))
    print()
    if result.bpb is not None:
        print(f"held-out: {result.bpb:.3f} bits/byte ({result.eval_loss:.3f} nats/token); "
              f"unigram baseline {baseline:.3f} bits/byte (entropy of the train tokens; "
              f"{baseline_heldout:.3f} as cross-entropy on the held-out tokens)")
    print(f"trained {result.step} steps, {result.tokens_seen:,} tokens in {result.train_seconds:.0f} s: "
          f"{result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%} of {result.mfu_peak_flops / 1e9:,.0f} GFLOP/s "
          f"({result.mfu_peak_source})")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.metrics}")
    print(f"loss curve: {result.plot if result.plot else result.plot_note}")
    print(f"wall time:  {time.perf_counter() - wall0:.0f} s")
    return 0


__all__ = ["register", "run_train", "run_demo"]
