"""How a prompt starts: a model trained here gets its prompts the way its training documents
started (right after an eos, never a bos); a Hugging Face tokenizer keeps its own bos policy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
import torch

from longcat.cli import main
from longcat.data import Tokenizer, iter_documents, prepare_tokens, train_tokenizer
from longcat.infer.engine import Engine
from longcat.infer.sampling import SamplingParams

TINY = ["--preset", "tiny", "--threads", "1", "--no-progress", "--peak-tflops", "0.1",
        "--set", "train.seq_len=32", "--set", "train.micro_batch=4", "--set", "train.tensorboard=false",
        "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0"]
ONE_TOKEN = SamplingParams(max_new_tokens=1, temperature=0)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(1)
    words = "the cat sat on a mat and then it ran to the red house where a dog lived".split()
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30)).capitalize() + "."}) + "\n")
    return root / "docs.jsonl"


def _contains(stream: list[int], part: list[int]) -> bool:
    return any(stream[i : i + len(part)] == part for i in range(len(stream) - len(part) + 1))


def test_trained_model_prompt_starts_like_its_training_documents(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(corpus), "--out", str(out), "--steps", "2"]) == 0

    # What the engine does with a text prompt for the trained run (the `generate` command's path)
    from longcat import load
    from longcat.infer.cli import find_tokenizer, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(out)
    tokenizer = load_tokenizer(find_tokenizer(model_dir, out))
    assert tokenizer.prompt_prefix == [tokenizer.eos_id]
    document = list(iter_documents(corpus, split="train"))[1]  # the first one opens the stream
    (result,) = Engine(load(model_dir), tokenizer).generate(document, ONE_TOKEN)
    prompt = result.prompt_token_ids
    assert prompt == [tokenizer.eos_id, *tokenizer.encode(document)]

    # What training saw: the same cache (recording the prompt policy did not change its key),
    # with that document right after an eos, and no bos anywhere.
    caches = sorted(p.name for p in (out / "cache").iterdir())
    store = prepare_tokens(corpus, tokenizer, out / "cache", show_progress=False)
    assert sorted(p.name for p in (out / "cache").iterdir()) == caches
    stream = store.train.tolist()
    assert tokenizer.bos_id not in stream
    assert _contains(stream, prompt)

    # The command line gives the same prompt length; --prompt-start overrides the policy.
    capsys.readouterr()
    for start, extra in (("tokenizer", 1), ("bos", 1), ("none", 0)):
        assert main(["generate", "--model", str(out), "--prompt", document, "--max-new-tokens", "1",
                     "--temperature", "0", "--json", "--prompt-start", start]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["prompt_tokens"] == len(tokenizer.encode(document)) + extra


def test_engine_prompt_start_options(corpus):
    from longcat.config import preset
    from longcat.model import build_model

    tokenizer = train_tokenizer(iter_documents(corpus), vocab_size=300, show_progress=False)
    model = build_model(preset("tiny")).eval()
    ids = tokenizer.encode("the cat")
    for add_bos, start in ((None, [tokenizer.eos_id]), (True, [tokenizer.bos_id]), (False, [])):
        (result,) = Engine(model, tokenizer, add_bos=add_bos).generate("the cat", ONE_TOKEN)
        assert result.prompt_token_ids == start + ids, add_bos
    # token-id prompts are taken as given
    (result,) = Engine(model, tokenizer).generate([ids], ONE_TOKEN)
    assert result.prompt_token_ids == ids


def _word_level(specials: list[str], template: str | None = None) -> tokenizers.Tokenizer:
    vocab = {word: i for i, word in enumerate(["[UNK]", "hello", "world", *specials])}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    if template is not None:
        token = template.split()[0]
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single=template, special_tokens=[(token, vocab[token])])
    return hf


def test_hugging_face_tokenizers_keep_their_own_bos_policy(tmp_path):
    # Llama 3 style: tokenizer.json's post-processor puts bos first
    _word_level(["<s>", "</s>"], "<s> $A").save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.load(tmp_path).prompt_prefix == [3]
    # tokenizer_config.json's add_bos_token wins over tokenizer.json, as in transformers
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.load(tmp_path).prompt_prefix == []
    plain = tmp_path / "plain"
    plain.mkdir()
    _word_level(["<s>", "</s>"]).save(str(plain / "tokenizer.json"))
    assert Tokenizer.load(plain).prompt_prefix == []  # nothing declared: nothing added (GPT-2 style)
    (plain / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    assert Tokenizer.load(plain).prompt_prefix == [3]


def test_training_records_eos_start_even_for_a_foreign_tokenizer(tmp_path):
    foreign = Tokenizer(_word_level(["<s>", "</s>"], "<s> $A"))
    assert foreign.prompt_prefix == [foreign.bos_id]
    trained = foreign.for_training()
    assert trained.prompt_prefix == [trained.eos_id] == [4]
    assert trained.encode("hello world") == foreign.encode("hello world") == [1, 2]
    assert trained.sha256 == foreign.sha256  # same data ids, same token cache
    assert trained.for_training().to_json() == trained.to_json()
    trained.save(tmp_path / "tokenizer.json")  # what a checkpoint holds
    assert Tokenizer.load(tmp_path).prompt_prefix == [4]


def test_own_tokenizer_records_its_policy_and_older_ones_get_it_too(corpus):
    tokenizer = train_tokenizer(iter_documents(corpus), vocab_size=300, show_progress=False)
    assert tokenizer.prompt_prefix == [tokenizer.eos_id] == [2]
    # transformers reads the same policy from tokenizer.json
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.to_json()))
    assert hf("the cat")["input_ids"] == [2, *tokenizer.encode("the cat")]
    # a tokenizer trained before the policy was written down: same start, same cache key
    older = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    older.post_processor = None
    legacy = Tokenizer(older)
    assert legacy.prompt_prefix == [2] and legacy.sha256 == tokenizer.sha256
