"""`longcat generate`: text generation from a model directory, streamed to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with the latent-cache engine (optionally MTP speculative decoding)",
        description="Generate a continuation of one or more prompts. --model is a model directory "
                    "(ours or Hugging Face LongcatFlash) or a training run directory (its newest complete "
                    "checkpoint is used).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model, HF or training run directory")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="prompt as comma-separated token ids, e.g. 1,17,42 (repeatable; no tokenizer needed)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or a folder with one (default: the one next to the model)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default: 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the likeliest (default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="default: 1.0 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="default: 0 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="default: 0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="report each token's logprob and the N likeliest alternatives (with --json)")
    p.add_argument("--speculative", type=int, default=0, metavar="N",
                   help="draft N tokens per step with the MTP heads (default: 0 = plain decoding); same output "
                        "when greedy; faster when the drafts are accepted often (docs/INFERENCE.md says how to judge)")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="with --speculative: draft from the first N token ids only, a cheaper draft head (0 = the "
                        "full vocabulary; default: 2048 for a tokenizer trained by longcat, whose low ids are its "
                        "frequent tokens, the full vocabulary otherwise); output unchanged, acceptance may drop")
    p.add_argument("--compile", action="store_true",
                   help="wrap the model's decode step in torch.compile: the fastest decoding at small batches, "
                        "after tens of seconds of compilation per batch size on first use (cached on disk)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (text, token_ids, ttft_s, tokens_per_s, acceptance_rate, ...)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context for prompt plus new tokens (default: the model's max_position_embeddings)")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the end of a prompt that does not fit the context instead of failing")
    p.add_argument("--prompt-start", choices=("tokenizer", "bos", "none"), default="tokenizer",
                   help="what goes before a text prompt: the tokenizer's own policy (default; eos for models "
                        "trained by longcat, whose training documents start after one, a Hugging Face "
                        "tokenizer's bos setting otherwise), the bos token, or nothing")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and cache dtype (default: as stored)")
    p.add_argument("--weights-dtype", choices=["fp8", "bf16", "fp32"], default=None,
                   help="fp8: keep expert and projection weights in memory as e4m3 with 128x128 block scales "
                        "(half the bytes of bf16; quantized on load if the checkpoint is not FP8); bf16/fp32: "
                        "dequantize and cast every weight (default: as stored, FP8 checkpoints dequantized)")
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu, cuda, cuda:N, mps, xpu, ..., or auto for the best one present (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this node: N > 1 runs the generation on N ranks under torchrun, each holding "
                        "only its shard of the weights (docs/INFERENCE.md, \"Generating on several processes\")")
    p.add_argument("--parallel", default=None, metavar="LAYOUT",
                   help="how the ranks split the model: tp=T (attention heads and dense FFNs) and ep=E (experts), "
                        "on max(T, E) ranks, e.g. tp=2,ep=2 (default with --nproc N: tp=N,ep=N)")
    p.set_defaults(func=run)


def _user_error(message: str):
    from ..errors import UserError

    return UserError(message)


def resolve_model_dir(path: str | Path) -> Path:
    """The directory `longcat.load` reads for `path` (a run directory -> its newest checkpoint)."""
    from ..interop.runs import resolve
    from ..interop.safetensors_io import CheckpointError

    try:
        return resolve(path).weights
    except CheckpointError as exc:
        raise _user_error(str(exc)) from exc


def find_tokenizer(model_dir: Path, given: Path | None = None) -> Path | None:
    """tokenizer.json in the model directory, or in the folders above it up to `given`."""
    candidates = [model_dir, model_dir.parent, model_dir.parent.parent]
    if given is not None:
        candidates.append(given)
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def load_tokenizer(path: str | Path):
    """The tokenizer at path, with the ids a text prompt starts with (`Tokenizer.prompt_prefix`)."""
    from ..data import DataError, Tokenizer

    try:
        return Tokenizer.load(path)
    except DataError as exc:
        raise _user_error(str(exc)) from exc


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise _user_error(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.nproc != 1 or args.parallel:
        return _run_entry_point()
    return generate(args)


def _run_entry_point() -> int:
    """Several processes: `python -m longcat.infer` (infer/__main__.py) checks the layout, starts
    torchrun and runs the ranks; it is the entry point because the sharded model comes from
    longcat.parallel, which infer/ does not import."""
    import os
    import subprocess

    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise _user_error("under torchrun, run `torchrun ... -m longcat.infer ARGS` (without --nproc), "
                          "not `longcat generate`")
    argv = sys.argv[1:]
    if "generate" not in argv:
        raise _user_error("--nproc/--parallel need the command line `longcat generate ...` "
                          "(or run `python -m longcat.infer ...`)")
    argv = argv[argv.index("generate") + 1:]
    return subprocess.call([sys.executable, "-m", "longcat.infer", *argv])


def generate(args: argparse.Namespace, *, load_model=None) -> int:
    """`longcat generate` in this process; `load_model(path, device=, dtype=, weights_dtype=)`
    replaces `longcat.load` (a rank of a parallel generation passes its sharded loader)."""
    import torch

    from .. import load
    from ..devices import resolve_device
    from ..interop.safetensors_io import CheckpointError
    from ..telemetry import Telemetry
    from .engine import Engine
    from .sampling import GenerationError, SamplingParams

    if args.threads is not None:
        if args.threads < 1:
            raise _user_error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    prompts: list = list(args.prompt) + [_parse_ids(s) for s in args.prompt_ids]
    if not prompts:
        raise _user_error("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    model_dir = resolve_model_dir(args.model)
    tokenizer = None
    tok_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer(model_dir, Path(args.model))
    if tok_path is not None:
        tokenizer = load_tokenizer(tok_path)
    elif args.prompt:
        raise _user_error(f"no tokenizer.json next to {model_dir}: pass --tokenizer PATH, or give --prompt-ids")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = resolve_device(args.device, setting="--device")
    try:
        model = (load_model or load)(model_dir, device=device, dtype=dtype, weights_dtype=args.weights_dtype)
    except CheckpointError as exc:
        raise _user_error(str(exc)) from exc
    model.eval()
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
            logprobs=args.logprobs,
        )
        engine = Engine(model, tokenizer, max_seq_len=args.max_seq_len, speculative=args.speculative,
                        add_bos={"tokenizer": None, "bos": True, "none": False}[args.prompt_start],
                        compile=args.compile, draft_vocab=args.draft_vocab)
        events = engine.stream(prompts, params, truncate_prompt=args.truncate_prompt)
    except GenerationError as exc:
        raise _user_error(str(exc)) from exc

    results = {}
    live = args.stream and len(prompts) == 1  # several prompts: each printed when it is done
    if live and not args.json and isinstance(prompts[0], str):
        print(prompts[0], end="", flush=True)
    with Telemetry(device, interval_s=0.5) as telemetry:
        _consume(events, args, prompts, tokenizer, live, results)
    if live and not args.json:
        print()
    for i in sorted(results):
        r = results[i]
        if args.json:
            print(json.dumps({"index": i, **r.to_dict()}))
        else:
            _print_stats(r, many=len(prompts) > 1)
    print(_telemetry_line(telemetry.summary()), file=sys.stderr)
    return 0


def _telemetry_line(summary: dict) -> str:
    """Peak memory, CPU and energy of the generation, from the telemetry sampler."""
    fields = summary["fields"]
    parts = []
    if "rss_bytes" in fields:
        parts.append(f"peak RSS {fields['rss_bytes']['peak'] / 2**30:.2f} GiB")
    if "device_memory_bytes" in fields:
        parts.append(f"peak device memory {fields['device_memory_bytes']['peak'] / 2**30:.2f} GiB")
    if "cpu_percent" in fields:
        parts.append(f"CPU {fields['cpu_percent']['mean']:.0f}% on average")
    if summary.get("energy_j") is not None:
        parts.append(f"{summary['energy_j']:.1f} J ({summary['energy_source']})")
    return "telemetry: " + (", ".join(parts) if parts else "no counters readable here")


def _consume(events, args, prompts, tokenizer, live: bool, results: dict) -> None:
    for event in events:
        if live:
            if args.json:
                print(json.dumps({"index": event.index, "token_ids": event.token_ids, "text": event.text}), flush=True)
            else:
                print(event.text if tokenizer is not None else "".join(f" {t}" for t in event.token_ids),
                      end="", flush=True)
        if event.result is not None:
            results[event.index] = event.result
            if not live and not args.json:
                _print_result(prompts[event.index], event.result, tokenizer is not None, many=len(prompts) > 1)


def _print_result(prompt, result, has_text: bool, many: bool) -> None:
    if many:
        print(f"--- prompt {result.index}")
    if has_text and isinstance(prompt, str):
        print(prompt + (result.text or ""), flush=True)
    elif has_text:
        print(result.text or "", flush=True)
    else:
        print(" ".join(str(t) for t in result.token_ids), flush=True)


def _print_stats(r, many: bool) -> None:
    label = f"[{r.index}] " if many else ""
    line = (f"{label}{len(r.token_ids)} tokens ({r.finish_reason}), first token {r.ttft_s * 1000:.0f} ms, "
            f"{r.tokens_per_s:.1f} tokens/s")
    if r.acceptance_rate is not None:
        line += f", draft acceptance {r.acceptance_rate:.0%}"
    print(line, file=sys.stderr)
