"""Tokenizer training and loading, the token cache, packed batches, the sampler, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

from longcat.data import (
    SPECIAL_TOKENS,
    DataError,
    PackedBatches,
    Tokenizer,
    TokenStore,
    eval_batches,
    iter_documents,
    open_corpus,
    prepare_tokens,
    token_dtype,
    train_tokenizer,
)
from longcat.data import tokens as tokens_module

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text — with dashes, émojis 🐈 and 中文字符.\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Cat:\n    def meow(self):\n        return 'meow'\n",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of 200 small documents: enough for both splits to have documents."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(200):
        (root / f"doc{i:03d}.txt").write_text(f"{TEXTS[i % len(TEXTS)]}# document {i}\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus_dir) -> Tokenizer:
    return train_tokenizer(iter_documents(corpus_dir), vocab_size=400, show_progress=False)


# --- tokenizer -----------------------------------------------------------------------------------------


def test_trained_tokenizer_special_ids_and_roundtrip(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert "<|im_start|>" in SPECIAL_TOKENS and "<|reserved_0|>" in SPECIAL_TOKENS
    assert len(SPECIAL_TOKENS) + 256 < tokenizer.vocab_size <= 400
    for text in TEXTS + ["never seen: ☃ \x00 \t\r\n ok"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    # Special-token strings inside data are text; only allow_special turns them into ids.
    assert tokenizer.eos_id not in tokenizer.encode("end <eos> here")
    assert tokenizer.decode(tokenizer.encode("end <eos> here")) == "end <eos> here"
    assert tokenizer.encode("<|im_start|>user", allow_special=True)[0] == tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id]) == "hi"
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]


def test_save_and_load(tokenizer, tmp_path):
    saved = tokenizer.save(tmp_path / "tok")
    assert saved == tmp_path / "tok" / "tokenizer.json"
    for source in (saved, saved.parent):
        loaded = Tokenizer.load(source)
        assert loaded.to_json() == tokenizer.to_json() and loaded.sha256 == tokenizer.sha256
        assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (
            tokenizer.vocab_size, 0, 1, 2)
        assert loaded.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    assert tokenizer.save(tmp_path / "named.json") == tmp_path / "named.json"
    assert not list(tmp_path.rglob("*.tmp"))


def foreign_tokenizer(specials: list[str]) -> tokenizers.Tokenizer:
    vocab = {word: i for i, word in enumerate(["[UNK]", "hello", "world", *specials])}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    return hf


def test_load_foreign_tokenizer(tmp_path):
    foreign_tokenizer(["<s>", "</s>", "<|im_end|>"]).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (6, 3, 4, 4)  # no pad: falls back to eos
    assert tok.encode("hello world") == [1, 2]
    # A tokenizer_config.json beside it names the roles (as in Hugging Face model folders).
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert Tokenizer.load(tmp_path).eos_id == 5
    # Without an end-of-text token documents cannot be separated: refused.
    foreign_tokenizer(["<s>"]).save(str(tmp_path / "noeos.json"))
    with pytest.raises(DataError, match=r"noeos\.json has no end-of-text token.*longcat tokenizer train"):
        Tokenizer.load(tmp_path / "noeos.json")
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "broken.json")


def test_train_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100, show_progress=False)
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer([], vocab_size=300, show_progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text'"):  # raised inside tokenizers' loop
        train_tokenizer(iter_documents(tmp_path), vocab_size=300, show_progress=False)


# --- token cache ---------------------------------------------------------------------------------------


def expected_stream(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    return [t for doc in docs for t in [*tokenizer.encode(doc), tokenizer.eos_id]]


def test_prepare_tokens_contents(corpus_dir, tokenizer, tmp_path):
    store = prepare_tokens(corpus_dir, tokenizer, tmp_path, show_progress=False)
    assert store.train.dtype == np.uint16 and store.heldout.dtype == np.uint16
    train_docs = list(iter_documents(corpus_dir, split="train"))
    held_docs = list(iter_documents(corpus_dir, split="heldout"))
    assert train_docs and held_docs
    assert store.train.tolist() == expected_stream(tokenizer, train_docs)  # eos after every document
    assert store.heldout.tolist() == expected_stream(tokenizer, held_docs)
    assert store.train_bytes == sum(len(d.encode()) for d in train_docs)
    assert store.heldout_bytes == sum(len(d.encode()) for d in held_docs)
    assert store.meta["train_docs"] == len(train_docs) and store.eos_id == tokenizer.eos_id
    assert store.path.parent == tmp_path and store.path.name.startswith("tokens-")
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_cache_hit_and_miss(tmp_path, tokenizer, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        (data / f"{i}.txt").write_text(TEXTS[i])
    cache = tmp_path / "cache"
    first = prepare_tokens(data, tokenizer, cache, show_progress=False)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache should hit")

    with monkeypatch.context() as m:
        m.setattr(tokens_module, "_tokenize_into", no_tokenizing)
        again = prepare_tokens(data, tokenizer, cache, show_progress=False)
        assert again.path == first.path and again.train.tolist() == first.train.tolist()
    other_tokenizer = train_tokenizer(TEXTS * 3, vocab_size=290, show_progress=False)
    paths = {
        first.path,
        prepare_tokens(data, other_tokenizer, cache, show_progress=False).path,
        prepare_tokens(data, tokenizer, cache, show_progress=False, max_bytes=60).path,
        prepare_tokens(data, tokenizer, cache, show_progress=False, text_field="body").path,
    }
    (data / "0.txt").write_text("changed text\n")
    changed = prepare_tokens(data, tokenizer, cache, show_progress=False)
    paths.add(changed.path)
    assert len(paths) == 5
    assert changed.train.tolist() + changed.heldout.tolist() != first.train.tolist() + first.heldout.tolist()
    assert len(list(cache.glob("tokens-*"))) == 5


def test_interrupted_tokenization_leaves_no_cache(tmp_path, tokenizer, corpus_dir, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(tokens_module, "ENCODE_BATCH_DOCS", 16)
    calls = {"n": 0}
    real_encode = Tokenizer.encode_batch

    def interrupted(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as from Ctrl-C in the middle of writing
        return real_encode(self, texts)

    with monkeypatch.context() as m:
        m.setattr(Tokenizer, "encode_batch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare_tokens(corpus_dir, tokenizer, cache, show_progress=False)
    assert calls["n"] == 3
    assert not list(cache.glob("tokens-*")) and not list(cache.glob(".tmp-*"))
    store = prepare_tokens(corpus_dir, tokenizer, cache, show_progress=False)
    assert len(store.train) + len(store.heldout) == len(expected_stream(tokenizer, list(iter_documents(corpus_dir))))


def test_killed_tokenization_leaves_no_cache(tmp_path, tokenizer, corpus_dir):
    """A process killed mid-write (no cleanup at all) leaves only a hidden temp folder, which the
    next run removes; no cache entry ever looks complete."""
    cache = tmp_path / "cache"
    tokenizer.save(tmp_path / "tok.json")
    script = textwrap.dedent(f"""
        import os
        from longcat.data import Tokenizer, prepare_tokens
        from longcat.data import tokens
        tokens.ENCODE_BATCH_DOCS = 16
        real = Tokenizer.encode_batch
        calls = []
        def dying(self, texts):
            calls.append(1)
            if len(calls) == 3:
                os._exit(9)  # like SIGKILL: no finally blocks, no cleanup
            return real(self, texts)
        Tokenizer.encode_batch = dying
        prepare_tokens({str(corpus_dir)!r}, Tokenizer.load({str(tmp_path / "tok.json")!r}), {str(cache)!r},
                       show_progress=False)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    leftovers = list(cache.glob(".tmp-tokens-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "train.bin").exists()
    assert not list(cache.glob("tokens-*"))
    store = prepare_tokens(corpus_dir, tokenizer, cache, show_progress=False)
    assert not list(cache.glob(".tmp-tokens-*"))
    assert store.train.tolist() == expected_stream(tokenizer, list(iter_documents(corpus_dir, split="train")))


def test_damaged_cache_entry_is_rebuilt(tmp_path, tokenizer, corpus_dir):
    store = prepare_tokens(corpus_dir, tokenizer, tmp_path, show_progress=False)
    good = store.train.tolist()
    path = store.path
    del store
    with open(path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="has 10 bytes"):
        TokenStore.open(path)
    rebuilt = prepare_tokens(corpus_dir, tokenizer, tmp_path, show_progress=False)
    assert rebuilt.path == path and rebuilt.train.tolist() == good


def test_single_file_holds_out_its_tail(tmp_path, tokenizer):
    text = "".join(TEXTS) * 20
    path = tmp_path / "one.txt"
    path.write_text(text)
    store = prepare_tokens(path, tokenizer, tmp_path / "cache", show_progress=False)
    stream = expected_stream(tokenizer, [text])
    assert store.train.tolist() + store.heldout.tolist() == stream
    assert len(store.heldout) == int(np.ceil(len(stream) * tokens_module.HELDOUT_TAIL_FRACTION))
    assert "last 2%" in store.meta["heldout_rule"]
    assert abs(store.train_bytes + store.heldout_bytes - len(text.encode())) <= 4
    assert abs(store.heldout_bytes - len(tokenizer.decode(store.heldout.tolist()).encode())) == 0


def test_max_bytes_limits_the_store(corpus_dir, tokenizer, tmp_path):
    full = prepare_tokens(corpus_dir, tokenizer, tmp_path, show_progress=False)
    small = prepare_tokens(corpus_dir, tokenizer, tmp_path, show_progress=False, max_bytes=2000)
    assert 2000 <= small.train_bytes + small.heldout_bytes < 2200
    assert len(small.train) < len(full.train) // 5
    with pytest.raises(DataError, match="max_bytes must be positive"):
        prepare_tokens(corpus_dir, tokenizer, tmp_path, max_bytes=0)


# --- packed batches ---------------------------------------------------------------------------------------


def take(batches: PackedBatches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batches.next_batch() for _ in range(n)]


def test_packing_windows_and_labels():
    tokens = np.arange(1000, dtype=np.uint16) % 97
    seq_len, batch_size = 16, 4
    batches = PackedBatches(tokens, seq_len, batch_size, seed=3)
    assert batches.windows == (1000 - 1) // seq_len == 62
    seen = []
    for _ in range(batches.windows // batch_size):
        before = batches.window_indices()
        inputs, labels = batches.next_batch()
        assert inputs.shape == labels.shape == (batch_size, seq_len)
        assert inputs.dtype == labels.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are the next tokens
        for row, window in enumerate(before):
            start = int(window) * seq_len
            assert inputs[row].tolist() == tokens[start:start + seq_len].tolist()
            assert labels[row].tolist() == tokens[start + 1:start + seq_len + 1].tolist()
        seen.extend(before.tolist())
    assert len(set(seen)) == len(seen)  # no window twice within an epoch
    assert batches.epoch == 0
    take(batches, 1)  # 60 windows taken: this batch completes epoch 0 and starts epoch 1
    assert batches.epoch == 1


def test_windows_see_document_ends(corpus_dir, tokenizer, tmp_path):
    store = prepare_tokens(corpus_dir, tokenizer, tmp_path, show_progress=False)
    batches = PackedBatches(store.train, 32, 8, shuffle=False)
    inputs, labels = batches.next_batch()
    flat = torch.cat([inputs.flatten(), labels[-1, -1:]]).tolist()  # rows 0..7 in stream order
    assert flat == store.train[:8 * 32 + 1].tolist()
    assert tokenizer.eos_id in inputs.flatten().tolist()
    first_doc = tokenizer.encode(next(iter(iter_documents(corpus_dir, split="train"))))
    assert labels[0, len(first_doc) - 1].item() == tokenizer.eos_id


def test_sampler_resumes_exactly():
    tokens = np.random.default_rng(0).integers(0, 500, 3000).astype(np.uint16)
    reference = PackedBatches(tokens, 20, 7, seed=11)
    expected = take(reference, 40)  # 280 windows: crosses two epoch boundaries (149 windows each)
    for k in (0, 5, 21, 33):
        first = PackedBatches(tokens, 20, 7, seed=11)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = PackedBatches(tokens, 20, 7, seed=999)  # seed comes from the state
        resumed.load_state_dict(state)
        for (x, y), (ex, ey) in zip(take(resumed, 40 - k), expected[k:]):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    assert reference.epoch == 1
    # Each epoch is a new permutation; the same seed gives the same one.
    a, b = PackedBatches(tokens, 20, 149, seed=11), PackedBatches(tokens, 20, 149, seed=12)
    epoch0, epoch1 = a.window_indices(), (take(a, 1), a.window_indices())[1]
    assert sorted(epoch0) == sorted(epoch1) == list(range(149))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, b.window_indices())
    with pytest.raises(DataError, match="the data, tokenizer or seq_len changed"):
        PackedBatches(tokens[:2000], 20, 7).load_state_dict(state)


def test_rank_sharding():
    tokens = np.random.default_rng(1).integers(0, 500, 5000).astype(np.uint16)
    world, batch_size = 3, 4
    ranks = [PackedBatches(tokens, 10, batch_size, seed=5, rank=r, world_size=world) for r in range(world)]
    single = PackedBatches(tokens, 10, batch_size * world, seed=5)
    for _ in range(50):  # 600 windows: crosses an epoch boundary (499 windows)
        shards = [r.window_indices() for r in ranks]
        flat = np.concatenate(shards)
        assert len(set(flat.tolist())) == len(flat)  # disjoint within the step
        assert np.array_equal(flat, single.window_indices())  # union = the single-process batch
        outs = [r.next_batch() for r in ranks]
        x, y = single.next_batch()
        assert torch.equal(torch.cat([o[0] for o in outs]), x) and torch.equal(torch.cat([o[1] for o in outs]), y)
    # Resuming a 3-rank run's state on 1 process with batch 12 continues the same list.
    resumed = PackedBatches(tokens, 10, batch_size * world, seed=0)
    resumed.load_state_dict(ranks[1].state_dict())
    assert torch.equal(resumed.next_batch()[0], single.next_batch()[0])
    with pytest.raises(DataError, match="rank 3 is not in a world of 3"):
        PackedBatches(tokens, 10, 4, rank=3, world_size=3)


def test_too_little_data():
    with pytest.raises(DataError, match="too few for one window"):
        PackedBatches(np.zeros(10, dtype=np.uint16), 16, 2)


def test_eval_batches():
    tokens = np.arange(101, dtype=np.uint16)
    batches = list(eval_batches(tokens, 10, 3, max_batches=100))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]  # 10 windows in order
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert inputs[:, 0].tolist() == list(range(0, 100, 10)) and torch.equal(labels, inputs + 1)
    assert len(list(eval_batches(tokens, 10, 3, max_batches=2))) == 2
    assert list(eval_batches(tokens, 10, 3, max_batches=2))[0][0].tolist() == batches[0][0].tolist()
    short = list(eval_batches(np.arange(7, dtype=np.uint16), 16, 4, max_batches=5))
    assert len(short) == 1 and short[0][0].tolist() == [[0, 1, 2, 3, 4, 5]]  # one shorter window
    with pytest.raises(DataError, match="at least 2"):
        list(eval_batches(np.zeros(1, dtype=np.uint16), 16, 4, max_batches=5))


# --- command line ------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    from longcat.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_tokenizer_train_and_prepare(corpus_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run_cli(["tokenizer", "train", "--data", str(corpus_dir), "--vocab-size", "300",
                    "--out", str(out), "--max-docs", "50", "--quiet"]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 300 and tok.eos_id == 2
    assert "saved" in capsys.readouterr().out
    assert run_cli(["data", "prepare", "--data", str(corpus_dir), "--tokenizer", str(out),
                    "--cache-dir", str(tmp_path / "cache"), "--max-bytes", "1k", "--quiet"]) == 0
    assert "train tokens" in capsys.readouterr().out
    with pytest.raises(DataError, match="does not exist"):
        run_cli(["tokenizer", "train", "--data", str(tmp_path / "missing"), "--quiet"])
    assert open_corpus(corpus_dir).description.startswith("data folder")
