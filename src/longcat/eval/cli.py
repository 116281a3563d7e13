"""`longcat eval longctx`: retrieval accuracy and perplexity against context length."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parse_lengths(text: str) -> list[int]:
    from .longctx import parse_length

    return [parse_length(t) for t in text.split(",") if t.strip()]


def _parse_depths(text: str) -> list[float]:
    from ..errors import UserError

    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}") from None


def run_longctx_cli(args: argparse.Namespace) -> int:
    import torch

    from .. import load
    from ..data import DataError
    from ..errors import UserError
    from ..infer.cli import find_tokenizer, load_tokenizer, resolve_model_dir
    from ..interop.safetensors_io import CheckpointError
    from .longctx import LongContextSetup, plot_heatmaps, run_longctx

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    from ..parallel.launch import is_torchrun_worker, run_under_torchrun

    worker = is_torchrun_worker()
    if args.nproc > 1 and not worker:
        argv = sys.argv[1:]
        if "eval" not in argv:
            raise UserError("--nproc needs the command line `longcat eval longctx ...`")
        code = run_under_torchrun(argv[argv.index("eval"):], nproc=args.nproc)
        if code != 0:
            print(f"longcat eval: the {args.nproc}-rank evaluation failed (exit {code}); see the rank output above",
                  file=sys.stderr)
            return 1
        return 0
    setup = LongContextSetup(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], lengths=_parse_lengths(args.lengths),
        depths=_parse_depths(args.depths), samples=args.samples, needle=args.needle, seed=args.seed,
        prefill_chunk=args.prefill_chunk, perplexity=not args.no_perplexity, ppl_windows=args.ppl_windows,
        dense=args.dense,
    )
    if args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if not setup.lengths:
        raise UserError("--lengths is empty; give e.g. 1k,4k,16k")
    model_dir = resolve_model_dir(args.model)
    tok_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer(model_dir)
    if tok_path is None:
        raise UserError(f"no tokenizer.json next to {model_dir}; pass --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    try:
        model = load(args.model)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    rank = 0
    if worker:
        import torch.distributed as dist

        from ..parallel.layout import init_distributed

        init_distributed("cpu")
        rank = dist.get_rank()
    log = (lambda _: None) if args.json or rank else (lambda line: print(line, file=sys.stderr))
    try:
        report = run_longctx(model, tokenizer, setup, data=args.data, log=log)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if worker:  # no barrier after a failure: the other ranks may wait in a collective; torchrun stops them
        from ..parallel.layout import shutdown_distributed

        shutdown_distributed()
    if rank:  # every rank has the same report; the first one writes it
        return 0
    result = report.to_dict()
    result["model"] = str(args.model)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["heatmaps"] = [str(p) for p in plot_heatmaps(report, out)]
        (out / "longctx.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"long-context evaluation of {args.model} ({result['setup']['attention']}, "
              f"{setup.samples} samples per cell, {report.seconds:.0f} s)")
        for task, acc in result["task_accuracy"].items():
            by_len = "  ".join(f"{L}: {sum(d.values()) / len(d):.0%}" for L, d in result["accuracy"][task].items())
            print(f"  {task:14s} {acc:6.1%}   by length  {by_len}")
        for p in result["perplexity"]:
            print(f"  perplexity at {p['context']:>8,} tokens: {p['ppl']:.2f} (last quarter {p['tail_ppl']:.2f}), "
                  f"{p['bpb']:.4f} bits/byte over {p['windows']} window(s)")
        if args.out:
            print(f"  heatmaps and JSON in {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluations: long-context retrieval and perplexity")
    evals = p.add_subparsers(dest="eval_command", metavar="EVALUATION", required=True)
    lc = evals.add_parser(
        "longctx", help="retrieval accuracy per task x length x depth, perplexity against context length",
        description="Synthetic retrieval (passkey, needle-in-a-haystack single and multi-key, variable tracking) "
        "with filler cut from held-out text, at every --lengths x --depths cell, through the inference engine "
        "(chunked prefill, LSA when the model has it); then the perplexity of held-out windows of each length. "
        "Lengths beyond the model's positions or this machine's memory are refused before anything runs.",
    )
    lc.add_argument("--model", required=True, metavar="DIR", help="model, HF or training run directory")
    lc.add_argument("--tasks", default="passkey,niah_single,niah_multikey,vt",
                    help="comma-separated: passkey, niah_single, niah_multikey, vt (default: all); "
                         "none: the perplexity curve only")
    lc.add_argument("--lengths", default="1k,4k,16k", help="prompt lengths in tokens, e.g. 1k,4k,16k or 4096")
    lc.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                    help="needle depths: the share of the filler before the needle (0 = start, 1 = end)")
    lc.add_argument("--samples", type=int, default=4, help="instances per task x length x depth cell (one batch)")
    lc.add_argument("--needle", choices=["number", "word", "uuid"], default="number",
                    help="value kind of the niah needles (default: number)")
    lc.add_argument("--seed", type=int, default=0, help="seed of the generated instances")
    lc.add_argument("--data", default=None, metavar="PATH",
                    help="corpus whose held-out split gives the filler and perplexity text (default: embedded)")
    lc.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer.json (default: next to the model)")
    lc.add_argument("--prefill-chunk", type=int, default=512, help="prompt positions per prefill forward")
    lc.add_argument("--dense", action="store_true", help="dense attention even when the model has LSA")
    lc.add_argument("--ppl-windows", type=int, default=4,
                    help="held-out windows per length for perplexity and bits per byte (default 4)")
    lc.add_argument("--no-perplexity", action="store_true", help="skip the perplexity curve")
    lc.add_argument("--nproc", type=int, default=1,
                    help="processes on this node (torchrun): each holds the whole model, every prompt is prefilled "
                         "context-parallel (each rank a contiguous slice) and the perplexity windows are split over "
                         "the ranks (default 1)")
    lc.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (per rank with --nproc; default: torch's choice)")
    lc.add_argument("--out", default=None, metavar="DIR", help="write longctx.json and a heatmap PNG per task here")
    lc.add_argument("--json", action="store_true", help="print the results as one JSON object")
    lc.set_defaults(func=run_longctx_cli)


__all__ = ["register"]
