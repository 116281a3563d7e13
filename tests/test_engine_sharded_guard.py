"""`Engine(compile=True)` refuses a model sharded for inference (its all-reduces run eagerly from
hooks and the MoE dispatcher) with one line naming the fix; the eager engine takes it."""

from __future__ import annotations

import pytest


def _sharded_tiny_model():
    from longcat.config import preset
    from longcat.model import build_model
    from longcat.parallel.inference import InferenceRanks, shard_for_inference
    from longcat.parallel.layout import ParallelLayout

    model = build_model(preset("tiny"), seed=0).eval()
    # rank 0 of tp=2,ep=2: cutting needs no process group, only a forward would
    ranks = InferenceRanks(ParallelLayout.parse("tp=2,ep=2"), rank=0, world_size=2, tp_rank=0, ep_rank=0,
                           tp_group=None, ep_group=None)
    return shard_for_inference(model, ranks)


def test_compiled_engine_refuses_a_model_sharded_for_inference():
    from longcat.errors import UserError
    from longcat.infer import Engine

    model = _sharded_tiny_model()
    with pytest.raises(UserError, match=r"compile=True\) does not support a model sharded .*use compile=False") as info:
        Engine(model, compile=True)
    assert "\n" not in str(info.value)
    assert Engine(model, compile=False).model is model
