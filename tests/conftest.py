"""Test-wide settings."""

import os
import random

import pytest
import torch

# CI has 2 cores and several tests start subprocesses; one intra-op thread per process avoids
# oversubscription (a fixture took 36 s instead of 3 s with torch's default on a busy machine).
torch.set_num_threads(1)


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small plain-text corpus (400 lines of a 20-word vocabulary) for end-to-end training runs;
    test modules that need another shape of data define their own `corpus`."""
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away with big red ball while sun shone over hills".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(400)))
    return path
