"""Long-context data: retrieval tasks of exact lengths, deterministic per seed, mixed into batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longcat.data import DataError, PackedBatches, train_tokenizer
from longcat.data.longctx import TASKS, RetrievalMix, RetrievalTasks, parse_tasks

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Pack my box with five dozen liquor jugs. The pass key is 12345. VAR ABCDE = 42. " * 20,
    "One of the special magic numbers for apple-river is: 7654321. What is the value? " * 20,
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def corpus(tokenizer):
    return np.asarray(tokenizer.encode(" ".join(TEXT) * 3), dtype=np.uint16)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("needle", ["number", "word", "uuid"])
def test_examples_have_exact_length_and_contain_the_answer(tokenizer, corpus, task, needle):
    tasks = RetrievalTasks(tokenizer, corpus, seed=3, needle=needle)
    for length in (900, 1500):
        for depth in (0.0, 0.5, 1.0):
            ex = tasks.example(task, length, depth, index=1)
            assert len(ex.input_ids) == length
            text = tokenizer.decode(ex.input_ids)
            assert ex.answer in text  # the needle holds the answer
            assert tokenizer.decode(ex.answer_ids).strip() == ex.answer
            assert len(ex.answer_ids) == tasks.answer_length(task, depth, index=1)


def test_depth_moves_the_needle(tokenizer, corpus):
    tasks = RetrievalTasks(tokenizer, corpus, seed=0)
    where = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = tasks.example("passkey", 2000, depth)
        text = tokenizer.decode(ex.input_ids)
        where.append(text.index(f"The pass key is {ex.answer}") / len(text))
    assert where == sorted(where) and where[0] < 0.15 and where[-1] > 0.85


def test_deterministic_per_seed(tokenizer, corpus):
    a = RetrievalTasks(tokenizer, corpus, seed=7).example("niah_multikey", 800, 0.3, index=2)
    b = RetrievalTasks(tokenizer, corpus, seed=7).example("niah_multikey", 800, 0.3, index=2)
    c = RetrievalTasks(tokenizer, corpus, seed=8).example("niah_multikey", 800, 0.3, index=2)
    assert a == b
    assert a.input_ids != c.input_ids


def test_generated_filler_and_bad_input(tokenizer):
    tasks = RetrievalTasks(tokenizer, None, seed=0)
    ex = tasks.example("vt", 600, 0.5)
    assert len(ex.input_ids) == 600 and "The grass is green" in tokenizer.decode(ex.input_ids)
    with pytest.raises(DataError, match="needs at least"):
        tasks.example("passkey", 10, 0.5)
    with pytest.raises(DataError, match="depth"):
        tasks.example("passkey", 600, 1.5)
    with pytest.raises(DataError, match="choose from"):
        parse_tasks("passkey,nope")
    with pytest.raises(DataError, match="needle kind"):
        RetrievalTasks(tokenizer, None, needle="emoji")


def test_mix_replaces_rows_by_ratio_and_resumes(tokenizer, corpus):
    T, B = 256, 8
    tasks = RetrievalTasks(tokenizer, corpus, seed=1)

    def make():
        return RetrievalMix(PackedBatches(corpus, T, B, seed=0), tasks, 0.5, ["passkey", "vt"], seed=4)

    mix = make()
    plain = PackedBatches(corpus, T, B, seed=0)
    swapped = 0
    for _ in range(6):
        inputs, labels = mix.next_batch()
        base, _ = plain.next_batch()
        assert inputs.shape == labels.shape == (B, T)
        assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels stay the next tokens
        for row, base_row in zip(inputs, base):
            if not torch.equal(row, base_row):
                swapped += 1
                assert "What is the" in tokenizer.decode(row.tolist())
    assert 12 <= swapped <= 36  # about half of 48 rows
    state = mix.state_dict()
    expected = [mix.next_batch() for _ in range(2)]
    again = make()
    again.load_state_dict(state)
    for (i1, l1), (i2, l2) in zip(expected, (again.next_batch() for _ in range(2))):
        assert torch.equal(i1, i2) and torch.equal(l1, l2)
    # the answer is the last label of a swapped row
    none = RetrievalMix(PackedBatches(corpus, T, B, seed=0), tasks, 0.0, seed=4).next_batch()
    plain = PackedBatches(corpus, T, B, seed=0).next_batch()
    assert torch.equal(none[0], plain[0])
