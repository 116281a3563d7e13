"""Parallel layout validation and helpers: no processes, no process groups."""

from __future__ import annotations

import pytest
import torch

from longcat.config import ConfigError, preset
from longcat.parallel.context import zigzag_index
from longcat.parallel.launch import relaunch_argv, torchrun_command
from longcat.parallel.layout import ParallelLayout, backend_for


@pytest.fixture(scope="module")
def tiny():
    return preset("tiny")  # 8 experts, 4 heads, 2 layers, ffn 128


def test_parse_full_layout_and_round_trip():
    layout = ParallelLayout.parse("dp_shard=2,ep=2,tp=1,cp=1,pp=1,dp_replicate=1")
    assert (layout.dp_shard, layout.ep, layout.tp, layout.cp, layout.pp, layout.dp_replicate) == (2, 2, 1, 1, 1, 1)
    assert layout.world_size == 2 and layout.dp_shard_mod_ep == 1
    assert ParallelLayout.parse(str(layout)) == layout
    assert ParallelLayout.parse("") == ParallelLayout()


@pytest.mark.parametrize("text, words", [
    ("dp_shrd=2", ["unknown --parallel name 'dp_shrd'", "dp_shard"]),
    ("dp_shard=two", ["dp_shard must be an integer"]),
    ("tp=0", ["tp must be >= 1"]),
    ("pp=2,pp_schedule=zigzag", ["pp_schedule must be one of"]),
    ("pp=2,pp_schedule=interleaved", ["pp_stages_per_rank >= 2"]),
    ("dp_shard", ["NAME=VALUE"]),
])
def test_parse_errors_name_the_problem(text, words):
    with pytest.raises(ConfigError) as err:
        ParallelLayout.parse(text)
    for word in words:
        assert word in str(err.value)


def _error(layout: str, config, world: int, **kw) -> str:
    with pytest.raises(ConfigError) as err:
        ParallelLayout.parse(layout).validate(config, world, **kw)
    return str(err.value)


def test_product_must_equal_world_size(tiny):
    msg = _error("dp_shard=2,tp=2", tiny, 2)
    assert "world size" in msg and "is 2" in msg and "set dp_shard=1" in msg
    msg = _error("dp_shard=2", tiny, 4)
    assert "set dp_shard=4" in msg


def test_ep_must_divide_dp_shard_and_experts(tiny):
    msg = _error("dp_shard=2,ep=4", tiny, 2)
    assert "ep=4 must divide dp_shard=2" in msg and "valid ep: [1, 2]" in msg
    six = tiny.replace(n_routed_experts=6, moe_topk=3)
    msg = _error("dp_shard=4,ep=4", six, 4)
    assert "6 routed experts" in msg and "n_routed_experts" in msg and "valid ep: [1, 2]" in msg


def test_heads_must_divide_by_tp(tiny):
    msg = _error("tp=3", tiny, 3)
    assert "tp=3 must divide num_attention_heads=4" in msg and "valid tp: [1]" in msg


def test_layers_must_divide_by_stages(tiny):
    msg = _error("pp=4", tiny, 4)
    assert "num_layers=2" in msg and "valid pp*pp_stages_per_rank: [1, 2]" in msg
    msg = _error("pp=2,pp_schedule=interleaved,pp_stages_per_rank=2", tiny, 2)
    assert "4 stages" in msg


def test_unsupported_loss_combinations_are_rejected_up_front(tiny):
    assert "MTP" in _error("pp=2", tiny, 2, with_mtp=True)
    assert "z-loss" in _error("pp=2", tiny, 2, with_aux_losses=True)
    assert "indexer loss" in _error("tp=2", tiny, 2, with_indexer_loss=True)
    assert "MTP heads shift" in _error("cp=2", tiny, 2, with_mtp=True)
    assert "tp and cp" in _error("tp=2,cp=2", tiny, 4)
    # the same layouts are fine without those losses
    ParallelLayout.parse("pp=2").validate(tiny, 2)
    ParallelLayout.parse("cp=2").validate(tiny, 2, seq_len=32, with_indexer_loss=True, with_aux_losses=True)


def test_sequence_and_batch_divisibility(tiny):
    msg = _error("cp=2", tiny, 2, seq_len=30)
    assert "2*cp=4 chunks" in msg and "seq_len=30" in msg
    msg = _error("dp_shard=2", tiny, 2, global_batch=3)
    assert "global batch of 3" in msg
    msg = _error("pp=2,pp_microbatches=4", tiny, 2, global_batch=2)
    assert "pp_microbatches=4" in msg
    assert "multiple of pp=2" in _error("pp=2,pp_microbatches=3", tiny, 2)


def test_zigzag_balances_and_covers_the_sequence():
    chunks = [zigzag_index(16, 2, r).tolist() for r in range(2)]
    assert chunks == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    four = torch.cat([zigzag_index(32, 4, r) for r in range(4)])
    assert sorted(four.tolist()) == list(range(32))
    # causal work per rank (sum of positions + 1) is equal under zig-zag
    work = {int((zigzag_index(32, 4, r) + 1).sum()) for r in range(4)}
    assert len(work) == 1


def test_router_bias_update_on_a_pipeline_rank_moves_only_its_layers(tiny):
    """The one router-bias rule (longcat.train.engine) on the layers a pipeline rank holds, keyed
    by their global index: layer i gets row i of the global update, the other layers nothing."""
    from torch import nn

    from longcat.model import build_model
    from longcat.train.engine import update_router_bias

    whole, part_of = build_model(tiny, seed=0), build_model(tiny, seed=0)

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny
            self.layers = nn.ModuleDict({"1": part_of.layers[1]})

    counts = torch.randint(0, 50, (tiny.num_layers, tiny.num_experts_total))
    for mode in ("sign", "diff"):
        update_router_bias(whole, counts, 1e-3, mode)
        update_router_bias(Stage(), counts, 1e-3, mode)
    bias = lambda m, i: m.layers[i].mlp.router.e_score_correction_bias  # noqa: E731
    torch.testing.assert_close(bias(part_of, 1), bias(whole, 1))
    assert not bias(part_of, 0).any() and bias(whole, 0).any()


def test_launcher_command_lines():
    cmd = torchrun_command(["-m", "longcat.train.parity_worker", "{}"], nproc=2, max_restarts=3)
    assert "--nproc-per-node=2" in cmd and "--max-restarts=3" in cmd and cmd[-3:] == ["-m", "longcat.train.parity_worker", "{}"]
    multi = torchrun_command(["x.py"], nproc=8, nnodes=4, rdzv_endpoint="node0:29500", node_rank=1)
    assert "--nnodes=4" in multi and "--rdzv-endpoint=node0:29500" in multi and "--node-rank=1" in multi
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(["x.py"], nproc=8, nnodes=4)
    argv = ["train", "--nproc", "2", "--parallel", "dp_shard=2", "--max-restarts=1", "--steps", "3"]
    assert relaunch_argv(argv) == ["train", "--parallel", "dp_shard=2", "--steps", "3"]


def test_backends():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == "nccl"


def test_check_command_rejects_a_bad_layout_before_launching(capsys):
    from longcat.cli import main

    assert main(["parallel", "check", "--nproc", "2", "--parallel", "dp_shard=2,ep=3"]) == 2
    err = capsys.readouterr().err
    assert "ep=3 must divide dp_shard=2" in err
    assert main(["parallel", "check", "--nproc", "3", "--parallel", "dp_shard=2"]) == 2
    assert "world size" in capsys.readouterr().err
