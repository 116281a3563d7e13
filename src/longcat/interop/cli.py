"""`longcat convert`: write a model, a checkpoint or a training run's newest checkpoint in another format.

The source is anything `longcat.load` reads (a multi-process run's DCP shards are consolidated in
this one process). Targets:
- `hf`: the published Hugging Face layout of the model's family (what transformers'
  LongcatFlashForCausalLM and the serving engines read);
- `longcat`: our own model directory;
- `fp8`: the published FP8 layout (e4m3 projection and expert weights, one fp32
  `weight_scale_inv` per 128x128 block = amax/448, a `quantization_config`);
- `bf16` / `fp32`: the published layout with FP8 weights dequantized (scale multiplied in).

A published source goes to fp8/bf16/fp32 key by key, streamed from memory maps, never loaded as a
model. Everything is written into a temporary sibling of OUT and moved into place at the end, so a
failed conversion leaves no half-written output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

FORMATS = {"hf": "Hugging Face / published layout", "longcat": "our model directory",
           "fp8": "published FP8 layout (block-scaled e4m3)", "bf16": "published layout, FP8 dequantized to bf16",
           "fp32": "published layout, FP8 dequantized to fp32"}
DTYPES = ("float32", "bfloat16", "float16")
# What a previous conversion leaves in OUT; --force removes these so stale shards cannot mix in.
_OUTPUT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json")
# Text `--check` runs both models on (encoded with the model's tokenizer when there is one).
CHECK_TEXT = ("the cat sat on a mat and the dog ran far away with a big red ball while the sun shone over the "
              "hills and the cat sat on the mat again")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="write a model or training run as a published (HF), FP8 or longcat model directory",
        description="Convert SOURCE (a model directory, a Hugging Face / published LongCat directory, BF16 or FP8, "
                    "a training run directory - its newest complete checkpoint, from one process or several - or "
                    "one checkpoint step_N) into OUT. With --to hf, transformers' LongcatFlashForCausalLM."
                    "from_pretrained(OUT) loads the result (models without n-gram embedding, sparse attention and "
                    "MTP heads; those are written in the published LongCat-Flash-Lite / LongCat-2.0 layouts).",
    )
    p.add_argument("source", metavar="SOURCE", help="model, HF, training run or checkpoint directory")
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help="target format: " + ", ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    p.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT, replacing the weights, config.json and tokenizer.json there")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help=f"--to hf/longcat: cast floating-point weights: {', '.join(DTYPES)} (default: as stored; "
                        "the router stays fp32)")
    p.add_argument("--identity-expert-rows", action="store_true",
                   help="--to hf: also write zero gate/up rows for the identity experts, which transformers "
                        "5.0-5.24 requires; by default only the real experts are written (Meituan's published "
                        "layout, read by transformers >= 5.25)")
    p.add_argument("--shard-mb", type=int, default=5120, metavar="MB",
                   help="largest safetensors shard in MiB; bigger outputs are sharded with an index (default: 5120)")
    p.add_argument("--check", action="store_true",
                   help="--to fp8: then run the original and the FP8 model on a short text and print the mean KL "
                        "divergence and top-1 agreement of their next-token distributions (loads both models)")
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


# ------------------------------------------------------------------------------------------------
# published -> published, key by key


# Where a dequantized output keeps the quantization_config it came from, so that converting it back
# to FP8 keeps the same modules in bf16.
DEQUANTIZED_FROM = "dequantized_from"


def skipped_modules(quantization_config: dict | None) -> set[str]:
    """The modules an FP8 checkpoint keeps unquantized (`ignored_layers` or `modules_to_not_convert`)."""
    q = quantization_config or {}
    return set(q.get("ignored_layers") or []) | set(q.get("modules_to_not_convert") or [])


def _skipped(key: str, skip: set[str]) -> bool:
    module = key[: -len(".weight")]
    return any(module == s or module.startswith(s + ".") for s in skip)


def stream_published(source, to: str, skip: set[str] = frozenset()) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """The tensors of a published checkpoint converted to `to` (fp8, bf16, fp32), one at a time;
    --to fp8 leaves the modules in `skip` unquantized."""
    import torch

    from ..model.fp8 import dequantize_blockwise, is_fp8, quantize_blockwise
    from .hf import SCALE_KEY_SUFFIX, fp8_key, scale_key

    dense = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(to)
    for key in source.keys():
        if key.endswith("." + SCALE_KEY_SUFFIX):
            continue
        with source.view(key) as t:
            scale = source.get(scale_key(key)) if is_fp8(t) else None
            if to == "fp8":
                if scale is not None:
                    yield key, t
                    yield scale_key(key), scale
                elif fp8_key(key) and t.dim() == 2 and not _skipped(key, skip):
                    q, s = quantize_blockwise(t)
                    yield key, q
                    yield scale_key(key), s
                else:
                    yield key, t
            elif scale is not None:
                yield key, dequantize_blockwise(t, scale, dense)
            else:
                yield key, t.to(dense) if t.is_floating_point() else t


def _published_config(raw: dict, to: str, keys: list[str]) -> dict:
    from .hf import fp8_quantization_config

    cfg = dict(raw)
    if to == "fp8":
        previous = cfg.pop(DEQUANTIZED_FROM, None)
        if not cfg.get("quantization_config"):
            cfg["quantization_config"] = previous or fp8_quantization_config(keys)
    else:
        if cfg.get("quantization_config"):
            cfg[DEQUANTIZED_FROM] = cfg.pop("quantization_config")
        cfg["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[to]
    return cfg


def _write_model(model, to: str, tmp: Path, args, tokenizer_json: str | None) -> None:
    import torch

    from ..config import to_hf_config
    from .hf import family_for, fp8_quantization_config, hf_tensors, quantized

    shard = args.shard_mb * 2**20
    if to == "longcat":
        from .native import save_model

        save_model(model, tmp, tokenizer_json=tokenizer_json)
        return
    if to == "hf":
        from .hf import save_hf

        save_hf(model, tmp, identity_expert_rows=args.identity_expert_rows, tokenizer_json=tokenizer_json,
                max_shard_bytes=shard)
        return
    from .safetensors_io import write_sharded

    tensors = ((k, v.detach().cpu()) for k, v in hf_tensors(model))
    if to == "fp8":
        tensors = quantized(tensors)
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[to]
        tensors = ((k, v.to(dtype) if v.is_floating_point() else v) for k, v in tensors)
    names: list[str] = []
    write_sharded(((names.append(k) or k, v) for k, v in tensors), tmp, max_shard_bytes=shard)
    cfg = to_hf_config(model.config, architecture=family_for(model.config).architecture)
    cfg["torch_dtype"] = "float32" if to == "fp32" else "bfloat16"
    if to == "fp8":
        cfg["quantization_config"] = fp8_quantization_config(names)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(tokenizer_json)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """The finished output in `tmp` becomes OUT: renamed when OUT is new or empty; with --force into a
    non-empty OUT, its previous outputs are removed and the new files moved in (other files stay)."""
    if not out.exists():
        tmp.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    for pattern in _OUTPUT_PATTERNS:
        for stale in out.glob(pattern):
            stale.unlink()
    for f in tmp.iterdir():
        f.rename(out / f.name)
    tmp.rmdir()


def run(args: argparse.Namespace) -> int:
    import torch

    from .loader import load
    from .runs import HF_MODEL, resolve
    from .safetensors_io import CheckpointError

    if args.to not in FORMATS:
        raise _user_error(f"--to {args.to}: unknown format; choose " + " or ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    if args.dtype is not None and args.dtype not in DTYPES:
        raise _user_error(f"--dtype {args.dtype}: unknown dtype; choose one of: {', '.join(DTYPES)}")
    if args.dtype is not None and args.to not in ("hf", "longcat"):
        raise _user_error(f"--dtype applies to --to hf and --to longcat; --to {args.to} fixes the dtypes itself")
    if args.check and args.to != "fp8":
        raise _user_error("--check compares an FP8 conversion with its source: use it with --to fp8")
    if args.shard_mb < 1:
        raise _user_error(f"--shard-mb must be >= 1, got {args.shard_mb}")
    out = Path(args.out)
    found = resolve(args.source)
    _check_out(out, found, args.force)
    tokenizer = _find_tokenizer(found)
    tokenizer_json = tokenizer.read_text() if tokenizer is not None else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    note = None
    what = f"{found.kind.replace('_', ' ')} {found.weights}"
    if found.checkpoint is not None:
        what = f"checkpoint {found.checkpoint}"
    try:
        if found.kind == HF_MODEL and args.to in ("fp8", "bf16", "fp32"):
            from .hf import open_published
            from .safetensors_io import write_sharded

            opened = open_published(found.weights)  # every check before anything is written
            names: list[str] = []
            try:
                skip = skipped_modules(opened.raw.get("quantization_config") or opened.raw.get(DEQUANTIZED_FROM))
                converted = stream_published(opened.source, args.to, skip)
                write_sharded(((names.append(k) or k, v) for k, v in converted), tmp,
                              max_shard_bytes=args.shard_mb * 2**20)
            finally:
                opened.source.close()
            cfg = _published_config(opened.raw, args.to, names)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            if tokenizer_json is not None:
                (tmp / "tokenizer.json").write_text(tokenizer_json)
            summary = f"{len(names)} tensors"
            what += f" ({opened.label})"
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            model = load(found.weights, dtype=dtype)
            _write_model(model, args.to, tmp, args, tokenizer_json)
            summary = f"{sum(p.numel() for p in model.parameters()):,} parameters"
            c = model.config
            extras = [name for name, on in (("n-gram embedding", c.ngram_enabled), ("sparse attention (LSA)",
                      c.lsa_enabled), ("MTP heads", c.mtp_num_layers > 0)) if on]
            if args.to == "hf" and extras:
                note = (f"note: transformers' LongcatFlashForCausalLM has no {', '.join(extras)}; they are written "
                        "in the published LongCat layouts, which longcat.load reads")
        _move_into_place(tmp, out, args.force)
    except CheckpointError as exc:
        raise _user_error(str(exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"wrote {out} ({args.to}: {summary}{', with tokenizer.json' if tokenizer else ''}) from {what}")
    if note:
        print(note)
    if args.check:
        reference = load(found.weights, dtype=torch.float32).eval()
        candidate = load(out, weights_dtype="fp8", dtype=torch.float32).eval()
        ids = check_ids(tokenizer, reference.config.vocab_size)
        kl, top1 = compare_logits(reference, candidate, ids)
        print(f"check: FP8 vs original on {ids.numel()} tokens: mean KL {kl:.3g} nats, top-1 agreement {top1:.2%}")
    return 0


def check_ids(tokenizer_path: Path | None, vocab_size: int):
    """The token ids `--check` runs: CHECK_TEXT through the model's tokenizer, or without one a fixed
    pseudo-random sequence."""
    import torch

    if tokenizer_path is not None:
        from ..data import Tokenizer

        ids = Tokenizer.load(tokenizer_path).encode(CHECK_TEXT)
        return torch.tensor([ids], dtype=torch.long)
    return torch.randint(3, vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))


def compare_logits(reference, candidate, ids) -> tuple[float, float]:
    """Mean KL(reference || candidate) of the next-token distributions, and the share of positions
    where both rank the same token first, over ids (B, T)."""
    import torch

    with torch.no_grad():
        p = reference(ids, mtp=False).logits.float().log_softmax(-1)
        q = candidate(ids, mtp=False).logits.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    return kl, top1


__all__ = ["register", "run", "FORMATS", "stream_published", "compare_logits", "check_ids"]
