"""`longcat bench model --profile`: the Trainer's own step, split by part."""

from __future__ import annotations

import json

import pytest

from longcat.bench.step_profile import format_profile, profile_train_step
from longcat.cli import main
from longcat.train.config import build_run_config


def _run(precision: str = "fp32"):
    return build_run_config(
        preset_name="tiny",
        overrides=["train.micro_batch=2", "train.seq_len=32", f"train.precision={precision}", "train.threads=1",
                   "train.peak_tflops=0.1"],
        train_values={"progress": False},
    )


def test_profile_splits_the_step_into_every_part():
    profile = profile_train_step(_run(), steps=1, warmup=1, repeats=1, log=lambda *_: None)
    names = [p.name for p in profile.parts]
    for expected in ("attention", "router", "expert GEMMs", "dispatch/combine", "dense FFNs", "norms", "embeddings",
                     "lm head + loss", "optimizer", "data", "other"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    assert profile.tokens_per_step == 2 * 32
    assert all(p.seconds >= 0 for p in profile.parts)
    # the parts and the remainder make up the step (the remainder is clamped at 0 when parts overshoot)
    assert sum(p.share for p in profile.parts) == pytest.approx(1.0, rel=0.5)
    experts = next(p for p in profile.parts if p.name.startswith("expert GEMMs"))
    assert experts.flops and experts.flops > 0  # counted by shape: the flop counter does not see grouped GEMMs
    attention = next(p for p in profile.parts if p.name.startswith("attention"))
    assert attention.flops and attention.calls == 2 * 2 + 1  # two sublayers per layer, plus the MTP layer
    text = format_profile(profile)
    assert "expert GEMMs" in text and "tokens/s" in text


def test_profile_cli_json(capsys):
    assert main(["bench", "model", "--profile", "--preset", "small", "--set", "num_layers=1", "--set",
                 "n_routed_experts=16", "--set", "zero_expert_num=8", "--set", "vocab_size=512",
                 "--batch", "2", "--seq-len", "16", "--rounds", "1", "--warmup", "0", "--precision", "fp32",
                 "--threads", "1", "--optimizer", "adamw", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_per_step"] == 32 and out["precision"] == "fp32"
    assert {p["name"].split(" ")[0] for p in out["parts"]} >= {"attention", "router", "optimizer", "other"}
