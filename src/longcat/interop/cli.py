"""`longcat convert`: write a model, a checkpoint or a training run's newest checkpoint in another format.

The source is anything `longcat.load` reads (a multi-process run's DCP shards are consolidated in
this one process); the target is a Hugging Face LongcatFlash directory (`--to hf`, what
transformers' LongcatFlashForCausalLM and the serving engines read) or our own model directory
(`--to longcat`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = {"hf": "Hugging Face LongcatFlash", "longcat": "our model directory"}
DTYPES = ("float32", "bfloat16", "float16")
# What a previous conversion leaves in OUT; --force removes these so stale shards cannot mix in.
_OUTPUT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="write a model or training run as a Hugging Face (or longcat) model directory",
        description="Convert SOURCE (a model directory, a Hugging Face LongcatFlash directory, a training run "
                    "directory - its newest complete checkpoint, from one process or several - or one checkpoint "
                    "step_N) into OUT. With --to hf, transformers' LongcatFlashForCausalLM.from_pretrained(OUT) "
                    "loads the result (models without n-gram embedding, sparse attention and MTP heads; those "
                    "are written in the LongCat-2.0 layout for readers that support them).",
    )
    p.add_argument("source", metavar="SOURCE", help="model, HF, training run or checkpoint directory")
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help="target format: " + ", ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    p.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT, replacing the weights, config.json and tokenizer.json there")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help=f"cast floating-point weights: {', '.join(DTYPES)} (default: as stored; the router stays fp32)")
    p.add_argument("--identity-expert-rows", action="store_true",
                   help="--to hf: also write zero gate/up rows for the identity experts, which transformers "
                        "5.0-5.24 requires; by default only the real experts are written (Meituan's published "
                        "layout, read by transformers >= 5.25)")
    p.set_defaults(func=run)


def _user_error(message: str):
    from ..errors import UserError

    return UserError(message)


def _check_out(out: Path, found, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise _user_error(f"output {out} is a file; give a directory path for OUT")
    sources = {p.resolve() for p in (found.given, found.weights, found.checkpoint) if p is not None}
    if out.resolve() in sources:
        raise _user_error(f"output {out} is the source itself; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise _user_error(f"output directory {out} exists and is not empty; choose another OUT or pass --force")


def _find_tokenizer(found) -> Path | None:
    for folder in (found.weights, found.checkpoint, found.given):
        if folder is not None and (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from .loader import load
    from .runs import resolve

    if args.to not in FORMATS:
        raise _user_error(f"--to {args.to}: unknown format; choose " + " or ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    if args.dtype is not None and args.dtype not in DTYPES:
        raise _user_error(f"--dtype {args.dtype}: unknown dtype; choose one of: {', '.join(DTYPES)}")
    out = Path(args.out)
    found = resolve(args.source)
    _check_out(out, found, args.force)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load(found.weights, dtype=dtype)
    tokenizer = _find_tokenizer(found)
    tokenizer_json = tokenizer.read_text() if tokenizer is not None else None
    if args.force and out.is_dir():
        for pattern in _OUTPUT_PATTERNS:
            for stale in out.glob(pattern):
                stale.unlink()
    if args.to == "hf":
        from .hf import save_hf

        save_hf(model, out, identity_expert_rows=args.identity_expert_rows, tokenizer_json=tokenizer_json)
    else:
        from .native import save_model

        save_model(model, out, tokenizer_json=tokenizer_json)

    what = f"{found.kind.replace('_', ' ')} {found.weights}"
    if found.checkpoint is not None:
        what = f"checkpoint {found.checkpoint}"
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({args.to}: {params:,} parameters{', with tokenizer.json' if tokenizer else ''}) from {what}")
    c = model.config
    extras = [name for name, on in (("n-gram embedding", c.ngram_enabled), ("sparse attention (LSA)", c.lsa_enabled),
                                    ("MTP heads", c.mtp_num_layers > 0)) if on]
    if args.to == "hf" and extras:
        print(f"note: transformers' LongcatFlashForCausalLM has no {', '.join(extras)}; they are written in the "
              "LongCat-2.0 layout, which longcat.load reads")
    return 0


__all__ = ["register", "run", "FORMATS"]
