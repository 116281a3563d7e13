"""Long-context data: synthetic retrieval tasks generated from a seed, and their mixing into
training batches.

Every example is built in token space: a task preamble, haystack filler, one or more needles
inserted at a depth, and a question whose answer the model must produce next. The filler is a
token stream (the corpus's own tokens, so a model reads text it knows between the needles) or,
without one, the classic passkey filler sentence repeated. Pieces are tokenized separately and
concatenated, the same way for training and evaluation, so the answer's tokens are exactly what a
model trained on these examples emits after the question.

Tasks (RULER-style, Hsieh et al. 2024, and the passkey test of Mohtashami & Jaggi 2023):

    passkey        "The pass key is 71432. Remember it." hidden in filler; answer the number
    niah_single    one "special magic {number|word|uuid} for KEY" needle; answer its value
    niah_multikey  several needles with different keys (distractors); answer the asked key's value
    vt             variable tracking: VAR A = 12345, VAR B = VAR A, ... scattered in the filler;
                   answer the value the last variable of the chain holds

`depth` is the share of the filler before the needle (0: right after the preamble, 1: right before
the question); multi-needle tasks put the asked needle at that depth and the others at random depths.
Examples are a pure function of (seed, index, task, length, depth): the same seed gives the same
tokens on any machine.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import numpy as np
import torch

from .errors import DataError

TASKS = ("passkey", "niah_single", "niah_multikey", "vt")
NEEDLE_KINDS = ("number", "word", "uuid")

# Filler when no corpus tokens are given (the passkey paper's haystack).
GENERATED_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                    "There and back again. ")
PASSKEY_PREAMBLE = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                    "Find it and memorize it. I will quiz you about it.\n")
NIAH_PREAMBLE = ("Some special magic values are hidden inside the following text. "
                 "Memorize them. I will quiz you about them.\n")
VT_PREAMBLE = "Memorize and track the chain of variable assignments hidden in the following text.\n"

# Words for keys and word needles: short, common, and distinct.
WORDS = (
    "apple", "river", "candle", "forest", "silver", "window", "garden", "pencil", "rocket", "planet",
    "button", "violet", "marble", "anchor", "basket", "castle", "dragon", "falcon", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "napkin", "orange", "pepper", "quartz", "saddle", "tunnel",
    "velvet", "wagon", "yellow", "zebra", "bridge", "copper", "desert", "engine", "feather", "glacier",
)


@dataclasses.dataclass(frozen=True)
class RetrievalExample:
    """One task instance: the prompt's token ids (the question at the end) and the answer's."""

    task: str
    length: int  # tokens of the prompt
    depth: float
    input_ids: list[int]
    answer_ids: list[int]
    answer: str

    def training_row(self) -> list[int]:
        """Prompt then answer: a training sequence of length + len(answer) tokens."""
        return self.input_ids + self.answer_ids


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """'passkey,vt' -> ['passkey', 'vt']; unknown names fail with the list of valid ones."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise DataError(f"unknown long-context task(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
    return names


class RetrievalTasks:
    """Generates retrieval examples of an exact token length from a tokenizer and filler tokens.

    tokenizer: anything with encode(str) -> ids (a `longcat.data.Tokenizer`).
    filler: a 1-D token stream to cut haystacks from (corpus tokens), or None for the generated filler.
    needle: "number", "word" or "uuid" (the value kind of the niah tasks).
    """

    def __init__(self, tokenizer, filler: np.ndarray | None = None, *, seed: int = 0, needle: str = "number",
                 multikey_needles: int = 4, vt_hops: int = 4) -> None:
        if needle not in NEEDLE_KINDS:
            raise DataError(f"needle kind '{needle}' is not one of {', '.join(NEEDLE_KINDS)}")
        self.tokenizer = tokenizer
        self.seed = seed
        self.needle = needle
        self.multikey_needles = max(2, multikey_needles)
        self.vt_hops = max(1, vt_hops)
        if filler is None:
            unit = np.asarray(self._encode(GENERATED_FILLER), dtype=np.int64)
            filler = np.tile(unit, 64)
            self._generated = True
        else:
            filler = np.asarray(filler)
            if filler.ndim != 1 or len(filler) < 64:
                raise DataError(f"filler must be a 1-D token stream of at least 64 tokens, got shape {filler.shape}")
            self._generated = False
        self.filler = filler

    # --- pieces -------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _haystack(self, rng: np.random.Generator, n: int) -> list[int]:
        """n filler tokens: from a random offset of the stream (wrapping), or the generated text."""
        if n <= 0:
            return []
        stream = self.filler
        start = 0 if self._generated else int(rng.integers(0, len(stream)))
        reps = (start + n) // len(stream) + 1
        if reps > 1:
            idx = (np.arange(start, start + n) % len(stream))
            return stream[idx].astype(np.int64).tolist()
        return stream[start:start + n].astype(np.int64).tolist()

    def _value(self, rng: np.random.Generator, kind: str | None = None) -> str:
        kind = kind or self.needle
        if kind == "number":
            return str(int(rng.integers(1_000_000, 10_000_000)))
        if kind == "word":
            return str(WORDS[int(rng.integers(len(WORDS)))]) + str(WORDS[int(rng.integers(len(WORDS)))])
        hexdigits = string.hexdigits[:16]
        chars = "".join(hexdigits[int(i)] for i in rng.integers(0, 16, 32))
        return f"{chars[:8]}-{chars[8:12]}-{chars[12:16]}-{chars[16:20]}-{chars[20:]}"

    def _keys(self, rng: np.random.Generator, n: int) -> list[str]:
        picked = rng.choice(len(WORDS), size=2 * n, replace=False)
        return [f"{WORDS[int(a)]}-{WORDS[int(b)]}" for a, b in zip(picked[:n], picked[n:])]

    # --- tasks ----------------------------------------------------------------------------------------
    def _spec(self, task: str, rng: np.random.Generator, depth: float):
        """(preamble, [(depth, needle text)], question, answer) of one instance."""
        if task == "passkey":
            key = str(int(rng.integers(10_000, 100_000)))
            needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
            return PASSKEY_PREAMBLE, [(depth, needle)], "\nWhat is the pass key? The pass key is", " " + key
        kind = {"number": "number", "word": "word", "uuid": "uuid"}[self.needle]
        if task in ("niah_single", "niah_multikey"):
            n = 1 if task == "niah_single" else self.multikey_needles
            keys = self._keys(rng, n)
            values = [self._value(rng) for _ in keys]
            depths = [depth] + [float(rng.random()) for _ in range(n - 1)]
            needles = [(d, f" One of the special magic {kind}s for {k} is: {v}. ") for d, k, v in zip(depths, keys, values)]
            question = (f"\nWhat is the special magic {kind} for {keys[0]} mentioned in the provided text? "
                        f"The special magic {kind} for {keys[0]} mentioned in the provided text is")
            return NIAH_PREAMBLE, needles, question, " " + values[0]
        if task == "vt":
            names = ["".join(string.ascii_uppercase[int(i)] for i in rng.integers(0, 26, 5)) for _ in range(self.vt_hops + 1)]
            value = str(int(rng.integers(10_000, 100_000)))
            chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {names[i + 1]} = VAR {names[i]}. " for i in range(self.vt_hops)]
            # the assignments stay in order; the first sits at `depth`, the rest spread after it
            depths = np.sort(depth + (1 - depth) * rng.random(self.vt_hops)).tolist()
            needles = list(zip([depth, *depths], chain))
            question = f"\nWhat is the value of VAR {names[-1]}? The value of VAR {names[-1]} is"
            return VT_PREAMBLE, needles, question, " " + value
        raise DataError(f"unknown long-context task '{task}'; choose from {', '.join(TASKS)}")

    def _rng(self, task: str, depth: float, index: int) -> np.random.Generator:
        # not seeded by the length: instance `index` holds the same needles at every length
        return np.random.default_rng((self.seed, TASKS.index(task) if task in TASKS else 99,
                                      int(round(depth * 1000)), index))

    def answer_length(self, task: str, depth: float, index: int = 0) -> int:
        """Tokens of the answer of instance `index` (the same at every length)."""
        return len(self._encode(self._spec(task, self._rng(task, depth, index), depth)[3]))

    def example(self, task: str, length: int, depth: float, index: int = 0) -> RetrievalExample:
        """Instance `index` of `task` with a prompt of exactly `length` tokens, the (first) needle at `depth`."""
        if not 0.0 <= depth <= 1.0:
            raise DataError(f"depth must be in [0, 1], got {depth}")
        rng = self._rng(task, depth, index)
        preamble, needles, question, answer = self._spec(task, rng, depth)
        head, tail = self._encode(preamble), self._encode(question)
        pieces = [(d, self._encode(text)) for d, text in needles]
        budget = length - len(head) - len(tail) - sum(len(p) for _, p in pieces)
        if budget < 0:
            minimum = length - budget
            raise DataError(f"a {task} example needs at least {minimum} tokens; ask for a length >= {minimum}")
        hay = self._haystack(rng, budget)
        # insertion points in the filler, in order of depth (stable, so equal depths keep their order)
        order = sorted(range(len(pieces)), key=lambda i: pieces[i][0])
        ids, cursor = list(head), 0
        for i in order:
            at = int(round(pieces[i][0] * budget))
            at = min(max(at, cursor), budget)
            ids += hay[cursor:at] + pieces[i][1]
            cursor = at
        ids += hay[cursor:] + tail
        assert len(ids) == length, (len(ids), length)
        return RetrievalExample(task, length, depth, ids, self._encode(answer), answer.strip())


class RetrievalMix:
    """Training batches with a share of rows replaced by synthetic retrieval examples.

    Wraps any batch source with `next_batch() -> (inputs, labels)` of (B, T) rows (PackedBatches):
    each row is swapped, with probability `ratio`, for a task example of T+1 tokens (prompt then
    answer, so the answer is the last labels). Which rows are swapped and what they hold depend on
    (seed, batch number) only, so resuming the wrapped source's state and this counter repeats the
    same batches.
    """

    def __init__(self, source, tasks: RetrievalTasks, ratio: float, task_names: Sequence[str] = TASKS, *,
                 seed: int = 0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise DataError(f"retrieval ratio must be in [0, 1], got {ratio}")
        self.source, self.tasks, self.ratio = source, tasks, ratio
        self.task_names = parse_tasks(list(task_names))
        self.seed = seed
        self.batches_taken = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = self.source.next_batch()
        rng = np.random.default_rng((self.seed, 0x10C7, self.batches_taken))
        self.batches_taken += 1
        B, T = inputs.shape
        swap = rng.random(B) < self.ratio
        if swap.any():
            inputs, labels = inputs.clone(), labels.clone()
        for row in np.flatnonzero(swap):
            task = self.task_names[int(rng.integers(len(self.task_names)))]
            depth = float(rng.random())
            ex = self._fitting_example(task, T, depth, int(rng.integers(1 << 31)))
            seq = torch.tensor(ex.training_row(), dtype=inputs.dtype)  # (T+1,)
            inputs[row], labels[row] = seq[:-1], seq[1:]
        return inputs, labels

    def _fitting_example(self, task: str, T: int, depth: float, index: int) -> RetrievalExample:
        """An example whose prompt plus answer is exactly T+1 tokens."""
        return self.tasks.example(task, T + 1 - self.tasks.answer_length(task, depth, index), depth, index)

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "retrieval_batches": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        if "retrieval_batches" not in state:
            # a checkpoint of a run without the mix: its sampler state is the source's own
            self.source.load_state_dict(state)
            return
        self.source.load_state_dict(state["source"])
        self.batches_taken = int(state["retrieval_batches"])


__all__ = ["TASKS", "NEEDLE_KINDS", "RetrievalExample", "RetrievalTasks", "RetrievalMix", "parse_tasks"]
