"""Bad published checkpoints: each problem is one CheckpointError line naming the file or key and
what to do, raised from the headers and config.json before the model is allocated."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longcat.cli import main
from longcat.interop import materialize as materialize_module
from longcat.interop.loader import load
from longcat.interop.safetensors_io import CheckpointError
from longcat.testing import write_published


@pytest.fixture()
def fixture(tmp_path, monkeypatch):
    """A fresh LongCat-Flash-Chat-FP8 fixture; loading it must fail before `materialize` allocates."""
    def allocating(*args, **kwargs):
        raise AssertionError("the model was allocated before the problem was found")

    monkeypatch.setattr(materialize_module, "materialize", allocating)
    return write_published(tmp_path / "ckpt", "flash-fp8")


def _shard_of(path, key):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def _rewrite(path, key, change):
    """Rewrite the shard holding `key` with change(tensors) applied."""
    shard = _shard_of(path, key)
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(shard))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _error(path, *patterns):
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    for p in patterns:
        assert p in message, message
    return message


EXPERT = "model.layers.1.mlp.experts.2.down_proj.weight"


def test_missing_shard(fixture):
    shard = _shard_of(fixture, EXPERT)
    shard.unlink()
    _error(fixture, shard.name, "missing", "download")


def test_truncated_shard(fixture):
    shard = _shard_of(fixture, EXPERT)
    shard.write_bytes(shard.read_bytes()[:-100])
    _error(fixture, shard.name, "truncated", "download")


def test_corrupt_header(fixture):
    shard = _shard_of(fixture, EXPERT)
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    _error(fixture, shard.name, "corrupt", "download")


def test_scale_grid_that_does_not_match_its_weight(fixture):
    key = "model.layers.0.self_attn.1.kv_a_proj_with_mqa.weight_scale_inv"  # weight (80, 192): grid (1, 2)
    _rewrite(fixture, key, lambda t: t.__setitem__(key, torch.ones(1, 1)))
    _error(fixture, key, "[1, 2]", "128x128")


def test_unexpected_key(fixture):
    key = "model.layers.0.mlp.shared_experts.gate_proj.weight"
    _rewrite(fixture, EXPERT, lambda t: t.__setitem__(key, torch.zeros(4, 4, dtype=torch.bfloat16)))
    _error(fixture, key, "unexpected", "LongCat-Flash-Chat")


def test_missing_key(fixture):
    _rewrite(fixture, EXPERT, lambda t: (t.pop(EXPERT), t.pop(EXPERT + "_scale_inv")))
    _error(fixture, EXPERT, "missing")


def test_fp8_weight_without_its_scale(fixture):
    _rewrite(fixture, EXPERT, lambda t: t.pop(EXPERT + "_scale_inv"))
    _error(fixture, EXPERT, "weight_scale_inv", "incomplete")


def test_unknown_family(fixture, capsys):
    cfg = json.loads((fixture / "config.json").read_text())
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (fixture / "config.json").write_text(json.dumps(cfg))
    _error(fixture, "DeepseekV3ForCausalLM", "LongCat family")
    assert main(["generate", "--model", str(fixture), "--prompt-ids", "1,2"]) == 2
    assert "DeepseekV3ForCausalLM" in capsys.readouterr().err


def test_shape_that_does_not_match_the_config(fixture):
    cfg = json.loads((fixture / "config.json").read_text())
    cfg["expert_ffn_hidden_size"] = 128
    (fixture / "config.json").write_text(json.dumps(cfg))
    _error(fixture, "experts", "shape", "config.json")
