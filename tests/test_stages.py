"""Context-extension stages: pre-train short, then yarn -> indexer-warmup -> sparse, each a new run
starting from the previous one's checkpoint (tiny sizes, a few steps each)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from longcat.cli import main
from safetensors.torch import load_file
from longcat.train.metrics import read_metrics

COMMON = ["--threads", "1", "--no-progress", "--peak-tflops", "0.1", "--set", "train.micro_batch=2",
          "--set", "train.tensorboard=false", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ("the cat sat on a mat and then it ran to the red house where a dog lived with two small "
             "birds that sang every morning while the sun rose over the hill").split()
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))}) + "\n")
    return root / "docs.jsonl"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pre"
    assert main(["train", "--preset", "tiny", *COMMON, "--data", str(corpus), "--out", str(out), "--steps", "3",
                 "--set", "model.yarn_factor=1", "--set", "model.max_position_embeddings=64",
                 "--set", "train.seq_len=64"]) == 0
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    step = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    return load_file(step / "model" / "model.safetensors")


@pytest.mark.slow
def test_stages_chain(tmp_path, corpus, pretrained):
    before = _weights(pretrained)
    yarn = tmp_path / "yarn"
    assert main(["train", "--stage", "yarn", "--init-from", str(pretrained), "--yarn-factor", "4", *COMMON,
                 "--data", str(corpus), "--out", str(yarn), "--steps", "2", "--set", "train.seq_len=128"]) == 0
    cfg = json.loads(next((yarn / "checkpoints").glob("step_*/train_config.json")).read_text())
    assert cfg["model"]["yarn_factor"] == 4.0
    assert cfg["model"]["yarn_original_max_position_embeddings"] == 64
    assert cfg["model"]["max_position_embeddings"] == 256
    assert cfg["train"]["stage"] == "yarn" and cfg["train"]["lsa_dense_warmup_steps"] == 2
    # the stage started from the pre-trained weights: after 2 small steps they are close, not re-initialised
    after = _weights(yarn)
    w = "layers.0.self_attn.0.q_a_proj.weight"
    assert (after[w] - before[w]).abs().max() < 0.5 * before[w].abs().max()

    warm = tmp_path / "warm"
    assert main(["train", "--stage", "indexer-warmup", "--init-from", str(yarn), *COMMON, "--data", str(corpus),
                 "--out", str(warm), "--steps", "3"]) == 0
    w_after = _weights(warm)
    y_after = _weights(yarn)
    changed = {k for k in w_after if not torch.equal(w_after[k], y_after[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)[:5]
    records = [r for r in read_metrics(warm / "metrics.jsonl") if r["kind"] == "train"]
    assert all("indexer_loss" in r for r in records)
    assert all(r["indexer_loss"] > 0 for r in records)  # the KL towards dense attention is trained

    sparse = tmp_path / "sparse"
    stage = tmp_path / "stage.toml"
    stage.write_text(f'[stage]\nkind = "sparse"\ninit_from = "{warm}"\nretrieval_ratio = 0.5\n'
                     f'retrieval_tasks = "passkey"\n[train]\nseq_len = 256\n')
    assert main(["train", "--config", str(stage), *COMMON, "--data", str(corpus), "--out", str(sparse),
                 "--steps", "2", "--set", "train.checkpoint_every=1"]) == 0
    cfg = json.loads(next((sparse / "checkpoints").glob("step_2/train_config.json")).read_text())
    assert cfg["train"]["stage"] == "sparse" and cfg["train"]["lsa_dense_warmup_steps"] == 0
    s_after = _weights(sparse)
    assert not torch.equal(s_after[w], w_after[w])  # everything trains again
    # resume the stage run: continues from its own checkpoint
    assert main(["train", "--resume", "--out", str(sparse), *COMMON, "--data", str(corpus), "--steps", "3"]) == 0
    assert [r["step"] for r in read_metrics(sparse / "metrics.jsonl") if r["kind"] == "train"][-1] == 3


def test_stage_errors(tmp_path, pretrained, corpus, capsys):
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "--init-from" in error(["train", "--stage", "sparse", *COMMON, "--out", str(tmp_path / "a")])
    assert "--yarn-factor" in error(["train", "--stage", "yarn", "--init-from", str(pretrained), *COMMON,
                                     "--out", str(tmp_path / "b")])
    err = error(["train", "--stage", "sparse", "--init-from", str(pretrained), *COMMON, "--data", str(corpus),
                 "--out", str(tmp_path / "c"), "--set", "train.seq_len=128"])
    assert "max_position_embeddings (64)" in err and "--stage yarn" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[stage]\nkind = "sparse"\nfactor = 3\n')
    assert "unknown key(s) in [stage]" in error(["train", "--config", str(bad), *COMMON, "--out", str(tmp_path / "d")])
    assert "--preset does not apply with --init-from" in error(["train", "--preset", "tiny", "--init-from",
                                                                str(pretrained), *COMMON, "--out", str(tmp_path / "e")])
    assert "--stage yarn" in error(["train", "--preset", "tiny", "--yarn-factor", "2", *COMMON, "--out", str(tmp_path / "f")])


def test_indexer_warmup_lowers_the_kl_towards_dense_attention():
    """The warm-up stage's model setup: only indexer weights train, and their KL falls. Larger init
    weights make the dense attention peaked, so there is something to learn."""
    from longcat.config import preset
    from longcat.model import build_model
    from longcat.train.config import TrainConfig
    from longcat.train.stages import prepare_model

    model = build_model(preset("tiny", initializer_range=0.2), seed=0).train()
    model.lsa_mode = "dense"
    prepare_model(model, TrainConfig(freeze="all-but-indexer"), initialise=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".indexer." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(x, mtp=False, indexer_loss=True).indexer_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_stage_starts_from_a_published_checkpoint(tmp_path):
    """The published Flash config has no MTP count: the keys say it, as `longcat.load` reads them."""
    from longcat.interop.loader import load_model_config
    from longcat.testing import write_published
    from longcat.train.stages import initial_run

    path = write_published(tmp_path / "flash", "flash")
    model, train, _, _ = initial_run(path)
    assert train is None
    assert model == load_model_config(path)
    assert model.mtp_num_layers == 1


@pytest.mark.parametrize("family", ["flash", "flash-fp8"])
def test_init_from_a_published_checkpoint_finetunes_it(tmp_path, corpus, family):
    """`longcat train --init-from DIR` alone is the finetune stage: the model, its config and its weights
    (BF16, or FP8 dequantized for training) come from a published-layout directory. With a vanishing lr
    and no router-bias update, the run's checkpoint holds exactly the weights it started from."""
    import longcat
    from longcat.testing import write_published

    published = write_published(tmp_path / family, family)
    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(published), *COMMON, "--data", str(corpus), "--out", str(out),
                 "--steps", "1", "--set", "train.seq_len=32", "--set", "train.lr=1e-30",
                 "--set", "train.router_bias_rate=0"]) == 0
    saved = json.loads(next((out / "checkpoints").glob("step_*/train_config.json")).read_text())["train"]
    assert saved["stage"] == "finetune" and saved["init_from"] == str(published)
    before = longcat.load(published, weights_dtype="fp32").state_dict()
    after = longcat.load(out).state_dict()
    assert set(before) == set(after)
    for name, value in before.items():
        torch.testing.assert_close(after[name].float(), value.float(), rtol=0, atol=1e-25, msg=name)
