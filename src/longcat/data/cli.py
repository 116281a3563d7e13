"""`longcat tokenizer train` and `longcat data prepare`."""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from .errors import DataError
from .util import parse_size


def register(subparsers) -> None:
    tokenizer = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tokenizer_sub.add_parser(
        "train", help="train a byte-level BPE tokenizer and save tokenizer.json",
        description="Train a byte-level BPE tokenizer (special tokens <pad>=0, <bos>=1, <eos>=2, "
                    "<|im_start|>, <|im_end|>, <|reserved_0..7|>) and save it as tokenizer.json.")
    add_data_arguments(train)
    train.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary size (default: 8192)")
    train.add_argument("--out", default="tokenizer.json",
                       help="a .json file name or a folder to write tokenizer.json into (default: ./tokenizer.json)")
    train.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=run_tokenizer_train)

    data = subparsers.add_parser("data", help="prepare training data (tokenize once into the cache)")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = data_sub.add_parser(
        "prepare", help="tokenize a corpus into the token cache and print its size",
        description="Tokenize a corpus into memory-mapped token files under the cache folder (done once; "
                    "later runs with the same files, tokenizer and options reuse them).")
    add_data_arguments(prepare)
    prepare.add_argument("--tokenizer", required=True, help="tokenizer.json, or a folder holding one")
    prepare.add_argument("--cache-dir", default=None,
                         help="cache folder (default: $LONGCAT_CACHE_DIR or ~/.cache/longcat)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bars")
    prepare.set_defaults(func=run_data_prepare)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data, --text-field and --max-bytes, shared by every command that reads a corpus."""
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="a file or folder of .txt, .md, .py, .jsonl or .parquet files "
                             "(default: the embedded corpus, Python's standard library and help text)")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="the field (.jsonl) or column (.parquet) that holds the text (default: text)")
    parser.add_argument("--max-bytes", type=_size, default=None, metavar="SIZE",
                        help="read at most about this much text, e.g. 20M (default: all)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_tokenizer_train(args) -> int:
    from .corpus import iter_documents
    from .tokenizer import train_tokenizer

    if args.max_docs is not None and args.max_docs < 1:
        raise DataError(f"--max-docs must be at least 1, got {args.max_docs}")
    documents = iter_documents(args.data, text_field=args.text_field, max_bytes=args.max_bytes)
    if args.max_docs is not None:
        documents = itertools.islice(documents, args.max_docs)
    started = time.perf_counter()
    tokenizer = train_tokenizer(documents, args.vocab_size, show_progress=not args.quiet)
    path = tokenizer.save(args.out)
    print(f"saved {path}: vocab size {tokenizer.vocab_size}, pad={tokenizer.pad_id} bos={tokenizer.bos_id} "
          f"eos={tokenizer.eos_id}, trained in {time.perf_counter() - started:.1f} s")
    return 0


def run_data_prepare(args) -> int:
    from .tokenizer import Tokenizer
    from .tokens import default_cache_dir, prepare_tokens

    tokenizer = Tokenizer.load(args.tokenizer)
    cache_dir = args.cache_dir or default_cache_dir()
    started = time.perf_counter()
    store = prepare_tokens(args.data, tokenizer, cache_dir, text_field=args.text_field,
                           show_progress=not args.quiet, max_bytes=args.max_bytes)
    total_bytes = store.train_bytes + store.heldout_bytes
    total_tokens = len(store.train) + len(store.heldout)
    print(f"{store.path}: {store.summary()}; {total_bytes / max(total_tokens, 1):.2f} bytes per token; "
          f"ready in {time.perf_counter() - started:.1f} s", file=sys.stdout)
    return 0
