"""Test-wide settings."""

import os
import random

import pytest
import torch
import torch._inductor.config as inductor_config

# CI has 2 cores and several tests start subprocesses; one intra-op thread per process avoids
# oversubscription (a fixture took 36 s instead of 3 s with torch's default on a busy machine).
torch.set_num_threads(1)

# torch.compile on CPU (inductor) builds each graph's C++ wrapper apart from its kernels, at a low
# optimisation level: the same generated code, built faster on CI's cold compile cache. One setting
# for every test: it is part of inductor's cache key, so graphs one test compiles serve the others.
inductor_config.cpp_wrapper_build_separate = True


@pytest.fixture(autouse=True, scope="session")
def _isolated_user_folders(tmp_path_factory):
    """Tests read the packaged catalog only and never write into the user's config or cache folders."""
    home = tmp_path_factory.mktemp("user")
    saved = {k: os.environ.get(k) for k in ("LONGCAT_CONFIG_DIR",)}
    os.environ["LONGCAT_CONFIG_DIR"] = str(home / "config")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Training runs set torch's thread count and determinism; every test starts from the same ones."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small plain-text corpus (400 lines of a 20-word vocabulary) for end-to-end training runs;
    test modules that need another shape of data define their own `corpus`."""
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away with big red ball while sun shone over hills".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(400)))
    return path


@pytest.fixture(scope="session")
def tiny_jsonl_run(tmp_path_factory):
    """(run, corpus): a 2-step `tiny` training run on a jsonl corpus of 600 word documents, for the
    tests that evaluate a trained run directory (long-context evaluation)."""
    import json

    from longcat.cli import main

    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to the red house where a dog lived".split()
    root = tmp_path_factory.mktemp("tiny-run")
    corpus = root / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))}) + "\n")
    run = root / "run"
    assert main(["train", "--preset", "tiny", "--threads", "1", "--no-progress", "--peak-tflops", "0.1",
                 "--data", str(corpus), "--out", str(run), "--steps", "2", "--set", "train.seq_len=64",
                 "--set", "train.micro_batch=2", "--set", "train.tensorboard=false", "--set", "train.eval_batches=1",
                 "--set", "train.sample_tokens=2"]) == 0
    return run, corpus


def arithmetic_sequences(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, length) token ids counting up from a random start by a random step of 1-3."""
    start = torch.randint(0, 480, (batch, 1), generator=gen)
    step = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + step * torch.arange(length)) % 480 + 10


@pytest.fixture(scope="session")
def arithmetic():
    """The sequences `trained` was trained on (a function of batch, length and generator)."""
    return arithmetic_sequences


@pytest.fixture(scope="module")
def trained():
    """A tiny model with two MTP heads, trained for a few seconds on arithmetic sequences, so the
    drafts are right often but not always."""
    from longcat.config import preset
    from longcat.model import build_model, lm_losses

    torch.manual_seed(0)
    model = build_model(preset("tiny", mtp_num_layers=2), seed=0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        x = arithmetic_sequences(16, 25, gen)
        loss = sum(lm_losses(model(x[:, :-1], mtp=True), x[:, 1:]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
