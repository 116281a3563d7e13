"""Checkpoints of `longcat train --nproc 2` connect to the rest: `longcat.load`, `longcat generate`,
`longcat convert --to hf` (read back by transformers), and one finder for both checkpoint formats.

The runs are real: `longcat train --nproc 2 --parallel ...` under torchrun on gloo, DCP shards on disk.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import longcat
from longcat.cli import main
from longcat.interop import runs
from longcat.interop.safetensors_io import CheckpointError
from longcat.model import LongCatForCausalLM

COMMON = ["--preset", "tiny", "--steps", "2", "--set", "train.seq_len=32", "--set", "train.micro_batch=4",
          "--set", "train.precision=fp32", "--set", "train.device=cpu", "--set", "train.eval_batches=2",
          "--threads", "1", "--no-progress", "--peak-tflops", "1"]
# What transformers' LongcatFlashForCausalLM can read: no n-grams, no sparse attention, no MTP heads.
PLAIN = ["--set", "model.oe_vocab_size_ratio=0", "--set", "model.index_n_heads=0", "--set", "model.mtp_num_layers=0"]


def _train(corpus: Path, out: Path, layout: str, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "longcat.cli", "train", "--data", str(corpus), *COMMON, *extra,
           "--nproc", "2", "--parallel", layout, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory):
    """dp_shard=2 on a model transformers can read."""
    return _train(corpus, tmp_path_factory.mktemp("fsdp") / "run", "dp_shard=2", *PLAIN)


@pytest.fixture(scope="module")
def ep_run(corpus, tmp_path_factory):
    """dp_shard=2,ep=2 on the full tiny preset (n-grams, LSA, MTP): experts sharded across ranks."""
    return _train(corpus, tmp_path_factory.mktemp("ep") / "run", "dp_shard=2,ep=2")


def _engine_view(step_dir: Path, **overrides):
    """The checkpoint as the training engine reads it back: its own DCP loader, into a plain model."""
    from longcat.interop.dcp import dcp_model_config
    from longcat.model import build_model
    from longcat.parallel.checkpoint import load_checkpoint

    model = build_model(dcp_model_config(step_dir).replace(**overrides), seed=12345)  # not the run's weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming a single process": yes
        load_checkpoint(step_dir, model, None)
    return model.eval()


def _heldout_loss(model, run_dir: Path, corpus: Path) -> float:
    """The held-out loss as the run's final evaluation computes it: mean over every held-out token."""
    from longcat.data import Tokenizer, eval_batches, prepare_tokens

    train = json.loads((runs.newest_complete(run_dir / "checkpoints") / "train_config.json").read_text())["train"]
    store = prepare_tokens(str(corpus), Tokenizer.load(run_dir / "tokenizer.json"), run_dir / "cache",
                           show_progress=False, max_bytes=train["max_bytes"])
    nats, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in eval_batches(store.heldout, train["seq_len"], train["micro_batch"], train["eval_batches"]):
            logits = model(torch.as_tensor(inputs)).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(labels).reshape(-1))
            nats += float(loss) * labels.numel()
            count += labels.numel()
    return nats / count


@pytest.mark.parametrize("which", ["fsdp_run", "ep_run"])
def test_load_run_directory_gives_the_trained_model(which, corpus, request):
    run = request.getfixturevalue(which)
    step = run / "checkpoints" / "step_00000002"
    assert runs.classify(run) == runs.RUN and runs.classify(step) == runs.DCP_CHECKPOINT
    model = longcat.load(run).eval()
    assert isinstance(model, LongCatForCausalLM)

    reference = _engine_view(step)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
    x = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)

    # the same model the run evaluated at its last step (through the sharded engine) just before saving
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert final_eval["step"] == 2
    loss = _heldout_loss(model, run, corpus)
    assert math.isclose(loss, final_eval["eval_loss"], rel_tol=1e-5), (loss, final_eval["eval_loss"])

    # the step directory itself and the checkpoints/ folder are accepted too
    assert torch.equal(longcat.load(step).lm_head.weight, model.lm_head.weight)
    assert torch.equal(longcat.load(run / "checkpoints").lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("which", ["fsdp_run", "ep_run"])
def test_generate_from_run_directory(which, request, capsys):
    run = request.getfixturevalue(which)
    prompt = [1, 17, 42, 9]
    args = ["generate", "--model", str(run), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "5",
            "--temperature", "0", "--ignore-eos", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    # greedy decoding of the loaded model, by full forwards
    model = longcat.load(run).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out["token_ids"] == ids[len(prompt):]
    assert main(["generate", "--model", str(run), "--prompt", "the cat", "--max-new-tokens", "3"]) == 0


def test_convert_run_to_hf_transformers_same_logits(fsdp_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    from longcat.reference import transformers_wants_identity_rows

    rows = ["--identity-expert-rows"] if transformers_wants_identity_rows() else []
    assert main(["convert", str(fsdp_run), "--to", "hf", str(out), *rows]) == 0
    assert "step_00000002" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and runs.classify(out) == runs.HF_MODEL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, info = transformers.LongcatFlashForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = longcat.load(fsdp_run).eval()
    x = torch.randint(3, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x).logits, ref.eval()(x).logits
    assert (a - b).abs().max().item() < 1e-5

    # and back: the HF directory loads as the same model
    again = longcat.load(out)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_convert_errors_are_one_line(fsdp_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    def error(*argv):
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "not empty" in error(str(fsdp_run), "--to", "hf", str(out)) and "--force" in error(str(fsdp_run), "--to", "hf", str(out))
    assert "unknown format" in error(str(fsdp_run), "--to", "onnx", str(tmp_path / "x"))
    assert "not a model or a training run" in error(str(tmp_path), "--to", "hf", str(tmp_path / "y"))
    assert "does not exist" in error(str(tmp_path / "nope"), "--to", "hf", str(tmp_path / "z"))
    step = fsdp_run / "checkpoints" / "step_00000002"
    assert "source itself" in error(str(step), "--to", "hf", str(step), "--force")
    assert main(["convert", str(fsdp_run), "--to", "longcat", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and runs.classify(out) == runs.MODEL


def _copy_step(src: Path, dst: Path, complete: bool) -> None:
    shutil.copytree(src, dst)
    if not complete:
        (dst / runs.COMPLETE).unlink()


def test_one_finder_for_both_formats_ignores_incomplete(fsdp_run, tmp_path):
    from longcat.interop.native import save_model
    from longcat.parallel import checkpoint as parallel_checkpoint
    from longcat.train import checkpoint as train_checkpoint

    assert train_checkpoint.newest_complete is runs.newest_complete
    assert parallel_checkpoint.newest_complete is runs.newest_complete
    assert not hasattr(parallel_checkpoint, "latest_checkpoint")
    dcp_step = fsdp_run / "checkpoints" / "step_00000002"
    model = longcat.load(fsdp_run)
    run = tmp_path / "run"
    ck = run / "checkpoints"
    _copy_step(dcp_step, ck / "step_00000004", complete=True)
    _copy_step(dcp_step, ck / "step_00000007", complete=False)      # a multi-process save cut short
    save_model(model, ck / "step_5" / "model")
    (ck / "step_5" / runs.COMPLETE).write_text("step 5\n")
    save_model(model, ck / "step_6" / "model")                      # no marker
    save_model(model, ck / "step_8.tmp-x1" / "model")               # a single-process save cut short
    (ck / "step_8.tmp-x1" / runs.COMPLETE).write_text("step 8\n")

    assert [s for s, _ in runs.list_complete(ck)] == [4, 5]
    assert runs.newest_complete(ck) == ck / "step_5"
    assert runs.resolve(run).weights == ck / "step_5" / "model"
    with pytest.raises(CheckpointError, match="incomplete"):
        runs.classify(ck / "step_00000007")
    with pytest.raises(CheckpointError, match="incomplete"):
        longcat.load(ck / "step_6")

    shutil.rmtree(ck / "step_5")
    assert runs.newest_complete(ck) == ck / "step_00000004"
    found = runs.resolve(run)
    assert found.kind == runs.DCP_CHECKPOINT and found.checkpoint == ck / "step_00000004"
    assert torch.equal(longcat.load(run).lm_head.weight, model.lm_head.weight)

    # steps compare as numbers, whatever the padding
    for n in (9, 10):
        save_model(model, ck / f"step_{n}" / "model")
        (ck / f"step_{n}" / runs.COMPLETE).write_text(f"step {n}\n")
    assert runs.newest_complete(ck) == ck / "step_10"

    only_partial = tmp_path / "partial"
    _copy_step(dcp_step, only_partial / "checkpoints" / "step_00000003", complete=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        longcat.load(only_partial)
    assert runs.newest_complete(tmp_path / "missing") is None


def test_classify_names_what_it_expected(tmp_path, fsdp_run):
    assert runs.classify(fsdp_run) == runs.RUN
    cases = {"a file": tmp_path / "f.txt", "empty dir": tmp_path / "empty", "config only": tmp_path / "cfg"}
    cases["a file"].write_text("x")
    cases["empty dir"].mkdir()
    cases["config only"].mkdir()
    (cases["config only"] / "config.json").write_text("{}")
    for path, expected in [(cases["a file"], "is a file"), (cases["empty dir"], "not a model or a training run"),
                           (cases["config only"], "no safetensors weights")]:
        with pytest.raises(CheckpointError, match=expected) as exc:
            runs.classify(path)
        assert "\n" not in str(exc.value)
    no_config = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(fsdp_run / "checkpoints" / "step_00000002", no_config)
    (no_config / "train_config.json").unlink()
    with pytest.raises(CheckpointError, match="train_config.json"):
        longcat.load(no_config)


@pytest.mark.slow
def test_pipeline_run_loads_without_mtp_heads(corpus, tmp_path):
    # one full held-out batch: how pipelined evaluation pads a short batch is the engine's business, not this test's
    run = _train(corpus, tmp_path / "run", "pp=2", "--set", "train.mtp_weight=0", "--set", "train.indexer_loss_weight=0",
                 "--set", "train.z_loss=0", "--set", "train.balance_loss=0", "--set", "train.eval_batches=1")
    with pytest.warns(UserWarning, match="no MTP weights"):
        model = longcat.load(run)
    assert model.config.mtp_num_layers == 0
    step = runs.newest_complete(run / "checkpoints")
    reference = _engine_view(step, mtp_num_layers=0)
    for name, t in model.state_dict().items():
        assert torch.equal(t, reference.state_dict()[name]), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert math.isclose(_heldout_loss(model.eval(), run, corpus), final_eval["eval_loss"], rel_tol=1e-5)
