"""From a RunConfig to a finished run: tokenizer, token cache, batches, Trainer.

Used by `longcat train` and `longcat demo`. The tokenizer comes from, in order: the checkpoint
being resumed, `train.tokenizer`, or a new byte-level BPE trained on the training split with
`model.vocab_size` tokens (saved as OUT/tokenizer.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..devices import resolve_device
from . import checkpoint as ckpt
from .config import RunConfig, run_config_from_dict
from .trainer import EvalData, Trainer, TrainResult

# Bytes of text the tokenizer trains on when none is given (BPE merges saturate long before).
TOKENIZER_TRAIN_BYTES = 16 * 2**20


@dataclass
class PreparedData:
    tokenizer: object
    store: object  # longcat.data.TokenStore
    tokenizer_source: str


def saved_run_config(out_dir: Path) -> RunConfig | None:
    """The RunConfig of the newest complete checkpoint in OUT, or None."""
    found = ckpt.newest_complete(Path(out_dir) / "checkpoints")
    if found is None:
        return None
    return run_config_from_dict(json.loads((found / "train_config.json").read_text()), str(found / "train_config.json"))


def prepare_data(run: RunConfig, out_dir: Path, *, resume: bool, console, tokenizer_bytes: int = TOKENIZER_TRAIN_BYTES) -> PreparedData:
    from ..data import Tokenizer, iter_documents, prepare_tokens, train_tokenizer

    cfg = run.train
    out_dir = Path(out_dir)
    found = ckpt.newest_complete(out_dir / "checkpoints") if resume else None
    if found is not None and (found / "tokenizer.json").exists():
        tokenizer, source = Tokenizer.load(found / "tokenizer.json"), f"from checkpoint {found}"
    elif cfg.tokenizer:
        if not Path(cfg.tokenizer).is_file():
            raise ConfigError(f"train.tokenizer: file not found: {cfg.tokenizer}")
        tokenizer, source = Tokenizer.load(cfg.tokenizer), f"loaded from {cfg.tokenizer}"
    else:
        cap = min(tokenizer_bytes, cfg.max_bytes) if cfg.max_bytes else tokenizer_bytes
        console.print(f"training a {run.model.vocab_size}-token BPE tokenizer on up to {cap / 2**20:.0f} MiB of "
                      f"{cfg.data or 'the embedded corpus'}", highlight=False)
        docs = iter_documents(cfg.data, text_field=cfg.text_field, split="train", max_bytes=cap)
        tokenizer = train_tokenizer(docs, vocab_size=run.model.vocab_size, show_progress=cfg.progress)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir / "tokenizer.json")
        source = f"trained, saved to {out_dir / 'tokenizer.json'}"
    tokenizer = tokenizer.for_training()  # checkpoints record that prompts start after eos, as documents do here
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "cache"
    store = prepare_tokens(cfg.data, tokenizer, cache_dir, text_field=cfg.text_field,
                           show_progress=cfg.progress, max_bytes=cfg.max_bytes)
    need = cfg.seq_len + 1
    if len(store.train) < need:
        raise ConfigError(
            f"the training split has only {len(store.train)} tokens, fewer than seq_len+1 = {need}; "
            "give more data or lower train.seq_len"
        )
    if len(store.heldout) < need:
        raise ConfigError(
            f"the held-out split has only {len(store.heldout)} tokens, fewer than seq_len+1 = {need}; "
            "give more data (about 1 document in 64 is held out) or lower train.seq_len"
        )
    return PreparedData(tokenizer, store, source)


def with_tokenizer_ids(run: RunConfig, tokenizer) -> RunConfig:
    """The model's special-token ids follow the tokenizer (the n-gram hash stops at eos)."""
    model = run.model.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return RunConfig(model=model, train=run.train)


def build_trainer(run: RunConfig, out_dir: Path, data: PreparedData, *, resume: bool, console, dims=None) -> Trainer:
    """The Trainer over the prepared data; `dims` (longcat.parallel.setup) puts it on a layout."""
    from ..data import PackedBatches, eval_batches

    cfg = run.train
    rank, data_ranks = 0, 1
    if dims is not None and cfg.retrieval_ratio <= 0:
        # Each data rank reads only its rows of the global batch (the windows the one-process batch
        # has there), which the step engine takes as this rank's share. The retrieval mix draws
        # per row of the global batch, so with it every rank reads the whole batch.
        rank, data_ranks = dims.dp_rank, dims.layout.dp
    batches = PackedBatches(data.store.train, cfg.seq_len, cfg.micro_batch // data_ranks, seed=cfg.seed,
                            rank=rank, world_size=data_ranks)
    heldout = data.store.heldout
    eval_data = EvalData(
        batches=lambda: eval_batches(heldout, cfg.seq_len, cfg.micro_batch, cfg.eval_batches),
        tokens=len(heldout),
        bytes=data.store.heldout_bytes,
    )
    return Trainer(run, out_dir, batches=batches, eval_data=eval_data, tokenizer=data.tokenizer,
                   resume=resume, console=console, dims=dims)


def unigram_bpb(tokens: np.ndarray, num_bytes: int, vocab_size: int) -> float:
    """Bits per byte of a unigram model: the entropy of the token distribution (nats/token) times
    tokens per byte, over ln 2. What a model that ignores context would reach."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    return entropy * len(tokens) / (num_bytes * math.log(2))


def unigram_heldout_bpb(train: np.ndarray, heldout: np.ndarray, heldout_bytes: int, vocab_size: int) -> float:
    """Bits per byte of the train tokens' unigram distribution (add-one smoothed) on the held-out
    tokens: the same yardstick as the model's held-out bpb."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    log_q = np.log((counts + 1) / (counts.sum() + vocab_size))
    nats = float(-log_q[np.asarray(heldout, dtype=np.int64)].mean())
    return nats * len(heldout) / (heldout_bytes * math.log(2))


def train_run(run: RunConfig, out_dir: Path, *, resume: bool, console) -> tuple[TrainResult, Trainer, PreparedData]:
    resolve_device(run.train.device, setting="train.device")  # a device this machine lacks fails before the data work
    data = prepare_data(run, out_dir, resume=resume, console=console)
    run = with_tokenizer_ids(run, data.tokenizer)
    trainer = build_trainer(run, out_dir, data, resume=resume, console=console)
    return trainer.train(), trainer, data


__all__ = ["PreparedData", "prepare_data", "build_trainer", "train_run", "unigram_bpb", "unigram_heldout_bpb",
           "saved_run_config", "with_tokenizer_ids"]
