"""Tokenize a corpus once into memory-mapped token files, cached by content.

Layout of one cache entry, `<cache_dir>/tokens-<hash>/`:
    train.bin, heldout.bin   token ids (uint16 when the vocabulary fits, else uint32), every
                             document followed by the eos id, documents in corpus order
    meta.json                counts (tokens, documents, UTF-8 bytes), dtype, eos id, how the
                             held-out split was made; written last
    key.json                 everything the hash covers (for a human reading the cache)

The hash covers the corpus file list with sizes and mtimes, the tokenizer.json content, the text
field, the split rule and max_bytes; change any of them and a new entry is built.

Atomicity: an entry is built in a hidden temp folder and renamed into place in one step, so an
interrupted run never leaves a `tokens-*` folder behind (a killed process may leave a `.tmp-*`
folder, which the next run removes). A lock file per entry lets concurrent processes (e.g. the
ranks of one torchrun job) wait for one tokenization instead of each doing their own.

Held-out split: documents whose key hashes into the held-out share (see corpus.is_heldout). A
corpus too small to have documents in both splits (a single text file, say) holds out the last
HELDOUT_TAIL_FRACTION of its token stream instead; meta.json says which rule applied, and the
held-out byte count is then measured by decoding the held-out tokens (exact up to a character cut
at the boundary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .corpus import Corpus, Document, open_corpus
from .errors import DataError
from .progress import byte_progress
from .tokenizer import Tokenizer

CACHE_VERSION = 1
HELDOUT_TAIL_FRACTION = 0.02
# Encode in batches of about this much text: big enough for tokenizers' threads, small in memory.
ENCODE_BATCH_BYTES = 1 << 20
ENCODE_BATCH_DOCS = 256


def default_cache_dir() -> Path:
    """$LONGCAT_CACHE_DIR, else $XDG_CACHE_HOME/longcat, else ~/.cache/longcat."""
    if os.environ.get("LONGCAT_CACHE_DIR"):
        return Path(os.environ["LONGCAT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "longcat"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclasses.dataclass
class TokenStore:
    """A tokenized corpus: two 1-D read-only memmaps of token ids, documents separated by eos."""

    path: Path
    train: np.ndarray
    heldout: np.ndarray
    train_bytes: int  # UTF-8 bytes of the train text (for bits per byte)
    heldout_bytes: int
    meta: dict

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenStore":
        """Open a finished cache entry; DataError when it is incomplete or its files do not match."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"])
            arrays = {}
            for split in ("train", "heldout"):
                file = path / f"{split}.bin"
                expected = int(meta[f"{split}_tokens"]) * dtype.itemsize
                if file.stat().st_size != expected:
                    raise DataError(f"{file} has {file.stat().st_size} bytes, expected {expected}")
                arrays[split] = (np.memmap(file, dtype=dtype, mode="r") if expected
                                 else np.zeros(0, dtype=dtype))
            return cls(path=path, train=arrays["train"], heldout=arrays["heldout"],
                       train_bytes=int(meta["train_bytes"]), heldout_bytes=int(meta["heldout_bytes"]), meta=meta)
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"token cache {path} is incomplete or damaged ({exc}); delete it to rebuild") from exc

    def summary(self) -> str:
        m = self.meta
        return (f"{m['train_tokens']:,} train tokens ({m['train_docs']:,} documents, {self.train_bytes:,} bytes), "
                f"{m['heldout_tokens']:,} held-out tokens ({m['heldout_docs']:,} documents, "
                f"{self.heldout_bytes:,} bytes); held out by {m['heldout_rule']}")


def prepare_tokens(data: str | os.PathLike | None, tokenizer: Tokenizer, cache_dir: str | os.PathLike, *,
                   text_field: str = "text", show_progress: bool = True, max_bytes: int | None = None) -> TokenStore:
    """Tokenize the corpus at `data` (None: the embedded corpus) once, and return the cached store.

    max_bytes: stop reading after about this many bytes of text (for quick runs); part of the key.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    corpus = open_corpus(data, text_field=text_field)
    key = {
        "version": CACHE_VERSION,
        "corpus": corpus.fingerprint(),
        "tokenizer_sha256": tokenizer.sha256,
        "max_bytes": max_bytes,
        "heldout_tail_fraction": HELDOUT_TAIL_FRACTION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"tokens-{digest}"
    store = _open_if_complete(final)
    if store is not None:
        return store
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache folder {cache_dir}: {exc.strerror or exc}") from exc
    with _lock(cache_dir / f".tokens-{digest}.lock"):
        store = _open_if_complete(final)  # another process may have built it while we waited
        if store is not None:
            return store
        if final.exists():
            shutil.rmtree(final)  # damaged (e.g. edited by hand): rebuild
        for stale in cache_dir.glob(f".tmp-tokens-{digest}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run; we hold the lock
        temp = cache_dir / f".tmp-tokens-{digest}-{os.getpid()}"
        try:
            temp.mkdir()
            (temp / "key.json").write_text(json.dumps(key, indent=1), encoding="utf-8")
            _tokenize_into(temp, corpus, tokenizer, max_bytes=max_bytes, show_progress=show_progress)
            os.rename(temp, final)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
    return TokenStore.open(final)


def _open_if_complete(path: Path) -> TokenStore | None:
    if not (path / "meta.json").is_file():
        return None
    try:
        return TokenStore.open(path)
    except DataError:
        return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block; no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builders each build, and the first rename wins
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tokenize_into(folder: Path, corpus: Corpus, tokenizer: Tokenizer, *, max_bytes: int | None,
                   show_progress: bool) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    counts = {f"{s}_{c}": 0 for s in ("train", "heldout") for c in ("tokens", "docs", "bytes")}
    started = time.perf_counter()
    total = corpus.estimated_bytes if max_bytes is None else min(max_bytes, corpus.estimated_bytes)
    with open(folder / "train.bin", "wb") as train_file, open(folder / "heldout.bin", "wb") as heldout_file, \
            byte_progress("tokenizing", total, enabled=show_progress) as bar:
        files = {"train": train_file, "heldout": heldout_file}
        for batch in _batches(corpus.documents(max_bytes=max_bytes)):
            encoded = tokenizer.encode_batch([doc.text for doc in batch])
            batch_bytes = 0
            for doc, ids in zip(batch, encoded):
                split = "heldout" if doc.heldout else "train"
                tokens = np.asarray(ids, dtype=np.int64)
                files[split].write(tokens.astype(dtype).tobytes())
                files[split].write(eos.tobytes())
                n_bytes = len(doc.text.encode("utf-8"))
                counts[f"{split}_tokens"] += len(ids) + 1
                counts[f"{split}_docs"] += 1
                counts[f"{split}_bytes"] += n_bytes
                batch_bytes += n_bytes
            tokens_so_far = counts["train_tokens"] + counts["heldout_tokens"]
            bar.update(batch_bytes, info=f"{tokens_so_far:,} tokens")
        for handle in files.values():
            handle.flush()
            os.fsync(handle.fileno())
    rule = "document key hash (corpus.is_heldout)"
    if counts["train_tokens"] == 0 or counts["heldout_tokens"] == 0:
        _hold_out_tail(folder, dtype, tokenizer, counts)
        rule = f"last {HELDOUT_TAIL_FRACTION:.0%} of the token stream (too few documents to split by document)"
    meta = {
        "version": CACHE_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "pad_id": tokenizer.pad_id,
        "corpus": corpus.description,
        "text_field": corpus.text_field,
        "max_bytes": max_bytes,
        "heldout_rule": rule,
        "seconds": round(time.perf_counter() - started, 3),
        **counts,
    }
    _write_synced(folder / "meta.json", json.dumps(meta, indent=1))


def _batches(documents: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc.text)
        if size >= ENCODE_BATCH_BYTES or len(batch) >= ENCODE_BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _hold_out_tail(folder: Path, dtype: np.dtype, tokenizer: Tokenizer, counts: dict) -> None:
    """Make one token stream of both files and move its last HELDOUT_TAIL_FRACTION to heldout.bin."""
    train_path, heldout_path = folder / "train.bin", folder / "heldout.bin"
    if counts["train_tokens"] == 0:  # every document was held out: they become the stream
        os.replace(heldout_path, train_path)
        for c in ("tokens", "docs", "bytes"):
            counts[f"train_{c}"], counts[f"heldout_{c}"] = counts[f"heldout_{c}"], 0
    total = counts["train_tokens"]
    if total < 4:
        raise DataError(f"the corpus has only {total} tokens; it needs more text to train on")
    held = max(math.ceil(total * HELDOUT_TAIL_FRACTION), 2)
    cut = total - held
    stream = np.memmap(train_path, dtype=dtype, mode="r")
    tail = np.array(stream[cut:])
    del stream
    with open(heldout_path, "wb") as handle:
        handle.write(tail.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.truncate(train_path, cut * dtype.itemsize)
    held_bytes = len(tokenizer.decode(tail.tolist()).encode("utf-8"))
    counts["heldout_tokens"], counts["train_tokens"] = held, cut
    counts["heldout_bytes"], counts["train_bytes"] = held_bytes, max(counts["train_bytes"] - held_bytes, 0)
    counts["heldout_docs"] = int(np.count_nonzero(tail == tokenizer.eos_id))  # documents that end there
    counts["train_docs"] -= counts["heldout_docs"]


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
