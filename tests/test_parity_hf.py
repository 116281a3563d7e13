"""Parity with the reference: transformers' LongcatFlashForCausalLM, same weights, same logits.

Both directions: we save -> transformers loads, and transformers saves -> we load.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from longcat.config import from_hf_config, preset
from longcat.interop.hf import save_hf
from longcat.interop.loader import load
from longcat.interop.safetensors_io import CheckpointError, SafetensorsDir
from longcat.model import build_model

transformers = pytest.importorskip("transformers")
from transformers import LongcatFlashForCausalLM  # noqa: E402

from longcat.reference import transformers_wants_identity_rows  # noqa: E402

# transformers 5.0-5.24 wants zero gate/up rows for the identity experts; 5.25+ the published layout
IDENTITY_ROWS = transformers_wants_identity_rows()

# No n-grams / LSA / MTP: transformers' LongcatFlash has none of them.
BASE = dict(oe_vocab_size_ratio=0.0, index_n_heads=0, mtp_num_layers=0)

CASES = {
    "zero-experts-yarn": dict(zero_expert_num=4, moe_topk=3, routed_scaling_factor=2.0, yarn_factor=4.0),
    "no-zero-experts": dict(zero_expert_num=0, moe_topk=2, routed_scaling_factor=1.0, yarn_factor=1.0),
    "topk5-scale6-yarn-mscale": dict(
        zero_expert_num=6, moe_topk=5, routed_scaling_factor=6.0, yarn_factor=8.0, yarn_mscale=1.0,
        yarn_mscale_all_dim=0.707, yarn_beta_fast=16.0,
    ),
    # (moe_topk=1 crashes inside transformers itself: its expert loop squeezes the k axis away)
    "topk2-3layers": dict(num_layers=3, zero_expert_num=2, moe_topk=2, routed_scaling_factor=3.5, yarn_factor=1.0),
}


def _model(case: str, seed: int = 0):
    cfg = preset("tiny", **BASE, **CASES[case])
    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # a non-zero router bias, so selection != plain top-k of probs
        for layer in model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _reference(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, info = LongcatFlashForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return ref.eval(), info


@pytest.mark.parametrize("case", list(CASES))
def test_we_save_transformers_loads(case, tmp_path):
    model = _model(case)
    save_hf(model, tmp_path, identity_expert_rows=IDENTITY_ROWS)
    ref, info = _reference(tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if model.config.yarn_enabled:
        assert ref.config.rope_parameters["rope_type"] == "yarn"
    x = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x).logits, ref(x).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_saves_we_load(case, tmp_path):
    # Random reference weights, built by transformers itself from our config.json.
    src = _model(case, seed=3)
    save_hf(src, tmp_path / "seed", identity_expert_rows=IDENTITY_ROWS)
    ref, _ = _reference(tmp_path / "seed")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights nobody but transformers has seen
    ref.save_pretrained(tmp_path / "hf")
    # transformers 5.0-5.24 writes the N+Z trap: gate/up rows for identity experts, no down_proj for them
    keys = SafetensorsDir(tmp_path / "hf").keys()
    N, Z = src.config.n_routed_experts, src.config.zero_expert_num
    if Z:
        assert (f"model.layers.0.mlp.experts.{N}.gate_proj.weight" in keys) == IDENTITY_ROWS
        assert f"model.layers.0.mlp.experts.{N}.down_proj.weight" not in keys
    ours = load(tmp_path / "hf")
    x = torch.randint(0, src.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(x).logits - ref(x).logits).abs().max().item() < 1e-5


def test_published_layout_and_identity_rows_layout_both_roundtrip(tmp_path):
    model = _model("zero-experts-yarn")
    N = model.config.n_routed_experts
    save_hf(model, tmp_path / "published")
    keys = SafetensorsDir(tmp_path / "published").keys()
    assert not any(f".experts.{N}." in k for k in keys)  # the N real experts only
    save_hf(model, tmp_path / "rows", identity_expert_rows=True)  # what transformers 5.0-5.24 writes
    keys = SafetensorsDir(tmp_path / "rows").keys()
    assert f"model.layers.0.mlp.experts.{N}.gate_proj.weight" in keys
    assert f"model.layers.0.mlp.experts.{N}.down_proj.weight" not in keys
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        expected = model(x).logits
        for folder in ("published", "rows"):
            assert torch.equal(expected, load(tmp_path / folder)(x).logits), folder


def test_sharded_checkpoint_with_index(tmp_path):
    model = _model("no-zero-experts")
    save_hf(model, tmp_path, max_shard_bytes=200_000, identity_expert_rows=IDENTITY_ROWS)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ref, info = _reference(tmp_path)
    assert not info["missing_keys"]
    again = load(tmp_path)
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
        assert (ref(x).logits - again(x).logits).abs().max() < 1e-5


def test_full_featured_model_roundtrips_through_hf_layout(tmp_path):
    """n-gram tables, indexer and MTP survive save_hf -> load (transformers itself ignores them)."""
    model = build_model(preset("tiny"), seed=5).eval()
    save_hf(model, tmp_path)
    keys = set(SafetensorsDir(tmp_path).keys())
    assert "model.oe_embed_tokens0.weight" in keys and "model.oe_embed_proj0.weight" in keys
    assert "model.layers.0.self_attn.0.indexer.wq_b.weight" in keys
    assert any(k.startswith("model.mtp.layers.0.") for k in keys)
    cfg = from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == model.config
    again = load(tmp_path)
    x = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = model(x, mtp=True), again(x, mtp=True)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    model = _model("no-zero-experts")
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
