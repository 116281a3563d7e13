"""Sharded construction: a model built on the meta device and laid out over real gloo ranks holds,
gathered back, exactly the weights `build_model(config, seed)` gives in one process.

Run as a script under torchrun (the tests below do that), this file is the worker: for each
layout in its JSON argument it builds the model on the meta device, calls `parallelize` (which
allocates and fills only the rank's shards), records how many parameter bytes the rank holds,
gathers every parameter and buffer to rank 0 and saves them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SEED = 7
# 510 embedding rows do not split evenly over 4 ranks: FSDP's uneven last shard is checked too
OVERRIDES = {"vocab_size": 510}


def _config(overrides: dict):
    from longcat.config import preset

    return preset("tiny", **{**OVERRIDES, **overrides})


@pytest.fixture
def tiny():
    return _config({})


def _worker(jobs: list[dict]) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from longcat.model import build_model
    from longcat.parallel.engine import parallelize, setup
    from longcat.parallel.layout import ParallelLayout, shutdown_distributed

    for job in jobs:
        config = _config(job.get("overrides", {}))
        dims = setup(ParallelLayout.parse(job["layout"]), config, device="cpu", seq_len=16)
        model = build_model(config, device="meta")
        pm = parallelize(model, dims, seq_len=16, seed=SEED)
        local: dict[str, torch.Tensor] = {}
        held = 0
        for name, p in pm.module.named_parameters():
            held += (p.to_local() if isinstance(p, DTensor) else p).numel()
            local[name] = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        for name, b in pm.module.named_buffers():
            local[name] = b
        for stage in pm.stages:
            for name, b in stage.named_buffers():
                local.setdefault(name, b)
        everything: list = [None] * dist.get_world_size()
        dist.all_gather_object(everything, ({k: v.detach().cpu().clone() for k, v in local.items()}, held))
        if dist.get_rank() == 0:
            merged: dict[str, torch.Tensor] = {}
            for state, _ in everything:
                merged.update(state)
            torch.save({"state": merged, "held": [h for _, h in everything]}, job["out"])
        dist.barrier()
    shutdown_distributed()


def _launch(tmp_path: Path, nproc: int, jobs: list[dict]) -> list[dict]:
    from longcat.parallel.launch import launch

    for i, job in enumerate(jobs):
        job["out"] = str(tmp_path / f"job{i}.pt")
    proc = launch([str(Path(__file__).resolve()), json.dumps(jobs)], nproc=nproc, threads_per_rank=1,
                  timeout=300, capture=True)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return [torch.load(job["out"], weights_only=False) for job in jobs]


def _assert_same_as_one_process(result: dict, overrides: dict, layout: str) -> None:
    from longcat.model import build_model

    reference = build_model(_config(overrides), seed=SEED)
    expected = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    got = result["state"]
    assert set(got) == set(expected), f"{layout}: {sorted(set(got) ^ set(expected))[:5]}"
    for name, value in expected.items():
        assert torch.equal(got[name], value.detach()), f"{layout}: {name} differs from the one-process init"
    total = sum(p.numel() for p in reference.parameters())
    assert max(result["held"]) < total, f"{layout}: a rank holds the whole model"


def test_init_values_of_any_box_are_the_slice_of_the_whole_tensor(monkeypatch):
    """The block scheme: a box costs only its blocks and equals the same box of the full tensor."""
    import random

    from longcat.model import lm

    monkeypatch.setattr(lm, "INIT_BLOCK_NUMEL", 64)  # many blocks per tensor, boxes straddle them
    rng = random.Random(0)
    for shape in [(10, 7), (4, 6, 5), (3, 70), (2, 3, 4, 5)]:
        full = lm.init_values("w", shape, 3, 0.02)
        for _ in range(30):
            offset = [rng.randrange(d) for d in shape]
            size = [rng.randint(1, d - o) for d, o in zip(shape, offset)]
            box = lm.init_values("w", shape, 3, 0.02, offset=offset, size=size)
            assert torch.equal(box, full[tuple(slice(o, o + n) for o, n in zip(offset, size))])
    # the name and the seed matter, the block size of the box does not
    assert not torch.equal(lm.init_values("w", (4, 5), 3, 0.02), lm.init_values("v", (4, 5), 3, 0.02))
    assert not torch.equal(lm.init_values("w", (4, 5), 3, 0.02), lm.init_values("w", (4, 5), 4, 0.02))


def test_meta_build_materialized_in_one_process_is_build_model(tiny):
    """One rank, no process group: the meta model filled by materialize_shards is build_model's."""
    from longcat.model import build_model
    from longcat.parallel.sharded_init import is_meta_model, materialize_shards

    meta = build_model(tiny, device="meta")
    assert is_meta_model(meta)
    held = materialize_shards([meta], torch.device("cpu"), SEED, tiny)
    reference = build_model(tiny, seed=SEED)
    assert held == sum(p.numel() * 4 for p in reference.parameters())
    for (name, a), (_, b) in zip(meta.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(meta.rotary.inv_freq, reference.rotary.inv_freq, rtol=0, atol=0)
    # a different seed gives different weights; the same seed the same ones every time
    assert not torch.equal(build_model(tiny, seed=SEED + 1).lm_head.weight, reference.lm_head.weight)
    assert torch.equal(build_model(tiny, seed=SEED).lm_head.weight, reference.lm_head.weight)


def test_half_meta_model_is_refused(tiny):
    from longcat.model import build_model
    from longcat.parallel.sharded_init import is_meta_model

    model = build_model(tiny, device="meta")
    model.lm_head.to_empty(device="cpu")
    with pytest.raises(ValueError, match="partly on the meta device"):
        is_meta_model(model)


TWO_RANKS = [
    {"layout": "dp_shard=2"},
    {"layout": "dp_shard=2,ep=2"},
    {"layout": "tp=2"},
    {"layout": "pp=2", "overrides": {"mtp_num_layers": 0}},
]


def test_two_ranks_hold_their_shards_of_the_one_process_weights(tmp_path):
    results = _launch(tmp_path, 2, [dict(j) for j in TWO_RANKS])
    for job, result in zip(TWO_RANKS, results):
        _assert_same_as_one_process(result, job.get("overrides", {}), job["layout"])


FOUR_RANKS = [
    {"layout": "dp_shard=4,ep=4"},
    {"layout": "dp_shard=4,ep=2"},  # 4 local experts FSDP-sharded over 2 ranks
    {"layout": "dp_shard=4,ep=4", "overrides": {"n_routed_experts": 4}},  # 1 local expert: Shard(1)
    {"layout": "dp_shard=2,tp=2"},  # FSDP over TP: strided shards
    {"layout": "dp_replicate=2,dp_shard=2,ep=2"},  # HSDP + EP
]


@pytest.mark.slow
def test_four_ranks_hold_their_shards_of_the_one_process_weights(tmp_path):
    results = _launch(tmp_path, 4, [dict(j) for j in FOUR_RANKS])
    for job, result in zip(FOUR_RANKS, results):
        _assert_same_as_one_process(result, job.get("overrides", {}), job["layout"])


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
