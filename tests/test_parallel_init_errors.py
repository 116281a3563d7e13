"""Bad layouts for sharded construction are refused in one line naming the degree, before any
process starts; and each data rank's batch is its rows of the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longcat.config import ConfigError, preset
from longcat.parallel.layout import ParallelLayout


def _error(layout: str, config, world: int, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        ParallelLayout.parse(layout).validate(config, world, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_more_ranks_than_the_layout_needs():
    tiny = preset("tiny")
    msg = _error("dp_shard=2", tiny, 4)
    assert "world size (--nproc * nodes) is 4" in msg and "set dp_shard=4" in msg
    msg = _error("tp=2", tiny, 3)  # no dp_shard makes 2*x = 3
    assert "change them" in msg and "dp_shard=3" in msg


def test_tensor_parallel_split_that_cuts_fp8_blocks():
    flash = preset("flash")  # q_b_proj has 64 heads x 192 rows: tp=64 leaves 192 rows, 1.5 blocks
    msg = _error("tp=64", flash, 64, fp8_block=128)
    assert "tp=64 cuts the 128x128 FP8 weight blocks of q_b_proj" in msg and "valid tp: [1, 2, 4, 8, 16, 32]" in msg
    ParallelLayout.parse("tp=8").validate(flash, 8, fp8_block=128)
    ParallelLayout.parse("tp=64").validate(flash, 64)  # BF16 weights have no blocks to cut


def test_bench_memory_refuses_a_layout_before_launching(monkeypatch):
    import longcat.parallel.launch as launch
    from longcat.bench.memory_bench import measure

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("processes were launched"))
    with pytest.raises(ConfigError, match="ep=3 must divide the 8 routed experts"):
        measure(preset("tiny"), ranks=[1, 3], phases=["train"], batch=3)


def test_each_data_rank_reads_its_rows_of_the_global_batch():
    """PackedBatches sharded by data rank yields exactly the global batch's rows of that rank, step
    after step, which is what build_trainer gives each rank on a layout."""
    from longcat.data import PackedBatches

    tokens = np.arange(5000, dtype=np.int64) % 997
    whole = PackedBatches(tokens, 16, 4, seed=3)
    parts = [PackedBatches(tokens, 16, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        inputs, labels = whole.next_batch()
        got = [p.next_batch() for p in parts]
        assert torch.equal(torch.cat([g[0] for g in got]), inputs)
        assert torch.equal(torch.cat([g[1] for g in got]), labels)


def test_the_engine_tells_a_rank_share_from_the_global_batch():
    """ParallelModel takes `global_batch / dp` rows as this rank's share and the global batch as a
    whole to split; without a global batch from setup it always splits."""
    from types import SimpleNamespace

    from longcat.parallel.engine import ParallelModel

    engine = ParallelModel.__new__(ParallelModel)
    engine.layout = ParallelLayout.parse("dp_shard=2")
    engine.dims = SimpleNamespace(global_batch=8)
    assert engine.rows_are_local(4) and not engine.rows_are_local(8)
    engine.dims.global_batch = None
    assert not engine.rows_are_local(4)
    engine.layout = ParallelLayout()
    engine.dims.global_batch = 4
    assert not engine.rows_are_local(4)
