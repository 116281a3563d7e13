"""`longcat info MODEL --parallel LAYOUT`: the parameters and bytes each rank holds under a layout
(`longcat generate`'s tp/ep cut or `longcat train`'s sharding), next to the planner's per-device
memory. The per-rank figures are checked against what one process really allocates (a load of a
published fixture, BF16 and FP8) and against the shards real gloo ranks hold after `parallelize`
(slow test); bad layouts are one line naming the degree to change.

Run as a script under torchrun (the slow test does that), this file is the worker: for each layout
it builds the tiny model on the meta device, lays it out with `parallelize` and records the
parameters each rank holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from longcat.cli import main


def _info(args: list[str], capsys) -> dict:
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _held_bytes(model) -> int:
    """Bytes of a loaded model's parameters and their FP8 block scales."""
    from longcat.model.fp8 import SCALE_SUFFIX

    scales = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(SCALE_SUFFIX))
    return sum(p.numel() * p.element_size() for p in model.parameters()) + scales


@pytest.mark.parametrize("family,stored", [("flash", "bf16"), ("flash-fp8", "fp8")])
def test_one_rank_holds_what_a_load_allocates_and_ep_halves_it(family, stored, tmp_path, capsys):
    """One rank: exactly what `longcat.load` allocates (FP8 stays FP8 as stored; --weights-dtype bf16
    upcasts): generate counts parameters and buffers, train the parameters and FP8 scales. ep=2
    halves the experts for generation; dp_shard=2,ep=2 halves every weight for training (experts
    over ep, the rest FSDP), but for FSDP's padding of FP8 scale grids with an odd number of rows."""
    from longcat.interop.loader import load
    from longcat.parallel.inference import local_bytes
    from longcat.testing import write_published

    path = write_published(tmp_path / family, family)
    loaded = load(path, weights_dtype=stored)
    one = _info([str(path), "--parallel", ""], capsys)["parallel"]
    assert one["purpose"] == "generate" and one["weights_dtype"] == stored and one["world_size"] == 1
    assert one["max_rank_bytes"] == local_bytes(loaded)
    trained = _info([str(path), "--parallel", "", "--for", "train"], capsys)["parallel"]
    assert trained["max_rank_bytes"] == _held_bytes(loaded)
    model = load(path, weights_dtype="bf16")
    assert trained["max_rank_parameters"] == one["max_rank_parameters"] == sum(p.numel() for p in model.parameters())
    upcast = _info([str(path), "--parallel", "", "--weights-dtype", "bf16"], capsys)["parallel"]
    assert upcast["max_rank_bytes"] == local_bytes(model)
    if stored == "fp8":
        assert one["max_rank_bytes"] < 0.75 * upcast["max_rank_bytes"]

    ep = _info([str(path), "--parallel", "ep=2"], capsys)["parallel"]
    experts = one["per_pp_rank"][0]["bytes_by_component"]["experts"]
    assert ep["world_size"] == 2 and 2 * ep["per_pp_rank"][0]["bytes_by_component"]["experts"] == experts
    assert ep["max_rank_bytes"] == one["max_rank_bytes"] - experts // 2
    assert ep["planner"]["weights"] > 0 and ep["planner_difference"] == pytest.approx(
        ep["planner"]["weights"] / ep["max_rank_bytes"] - 1)

    two = _info([str(path), "--parallel", "dp_shard=2,ep=2"], capsys)["parallel"]
    (rank,) = two["per_pp_rank"]
    padding = 2 * rank["bytes"] - trained["max_rank_bytes"]
    assert two["purpose"] == "train" and rank["ranks"] == 2
    assert padding == 0 if stored == "bf16" else 0 < padding < 1e-3 * trained["max_rank_bytes"]
    # the planner's figure for the same layout, and how far it is from the exact count
    planner = two["planner"]
    assert planner["problems"] == [] and planner["weights"] > 0 and planner["optimizer"] > planner["weights"]
    assert two["planner_difference"] == pytest.approx(planner["parameters"] / rank["parameters"] - 1)
    assert abs(two["planner_difference"]) < 0.05

    for layout in ("ep=2", "dp_shard=2,ep=2"):
        assert main(["info", str(path), "--parallel", layout]) == 0
        out = capsys.readouterr().out
        assert "Per rank for `longcat" in out and "planner (" in out


def test_pipeline_and_tensor_parallel_split_what_the_runtime_splits(capsys):
    """pp=2: each pipeline rank holds its layers, the first the embeddings, the last the head; tp=2
    halves the up-projections, o_proj and the dense FFNs but keeps the low-rank projections whole
    (the planner splits every dense weight, so it counts fewer parameters per device)."""
    from longcat.config import preset
    from longcat.info import rank_parameters
    from longcat.parallel.layout import ParallelLayout

    whole = _info(["tiny", "--parallel", "", "--for", "train"], capsys)["parallel"]["max_rank_parameters"]
    first, last = _info(["tiny", "--parallel", "pp=2"], capsys)["parallel"]["per_pp_rank"]
    config = preset("tiny")
    mtp = sum(p for name, p in _parameters(config).items() if name.startswith("mtp."))
    assert first["parameters"] + last["parameters"] == whole - mtp  # no MTP heads under a pipeline
    assert "embedding" in first["bytes_by_component"] and "ngram" in first["bytes_by_component"]
    assert "ngram" not in last["bytes_by_component"] and "mtp" not in last["bytes_by_component"]

    tp = rank_parameters(config, ParallelLayout.parse("tp=2"), "bf16")[0]
    shapes = _parameters(config)
    split = sum(n for name, n in shapes.items() if name.split(".")[-2] in
                ("q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert tp["parameters"] == whole - split // 2
    info = _info(["tiny", "--parallel", "tp=2", "--for", "train"], capsys)["parallel"]
    assert info["planner_difference"] < -0.1
    # generation cuts the same weights for tp=2 (and keeps the MTP heads)
    generate = _info(["tiny", "--parallel", "tp=2"], capsys)["parallel"]
    assert generate["purpose"] == "generate" and generate["max_rank_parameters"] == tp["parameters"]


def _parameters(config) -> dict[str, int]:
    import torch

    from longcat.model import LongCatForCausalLM

    with torch.device("meta"):
        model = LongCatForCausalLM(config)
    return {name: p.numel() for name, p in model.named_parameters()}


@pytest.mark.parametrize("args,needle", [
    (["tiny", "--parallel", "dp_shard=2,ep=3"], "ep=3 must divide dp_shard=2"),
    (["tiny", "--parallel", "tp=2,ep=3"], "the smaller degree must divide the larger"),
    (["tiny", "--parallel", "ep=3"], "ep=3 must divide the 8 routed experts"),
    (["tiny", "--parallel", "tp=2", "--nproc", "4"], "set --nproc 2"),
    (["tiny", "--parallel", "dp_shard=2", "--for", "generate"], "not supported for inference"),
    (["tiny", "--parallel", "tp=3"], "tp=3 must divide num_attention_heads=4"),
    (["tiny", "--parallel", "pp=3"], "which must divide num_layers=2"),
    (["tiny", "--parallel", "dp_shard=2", "--nproc", "4"], "set dp_shard=4"),
    (["tiny", "--parallel", "dp_shard=2,foo=1"], "unknown --parallel name 'foo'"),
    (["tiny", "--nproc", "2"], "add --parallel LAYOUT"),
    (["tiny", "--for", "train"], "add --parallel LAYOUT"),
])
def test_a_bad_layout_is_one_line_naming_the_degree(args, needle, capsys):
    assert main(["info", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_fp8_weights_refuse_a_tensor_split_that_cuts_their_blocks(tmp_path, capsys):
    from longcat.testing import write_published

    path = write_published(tmp_path / "fp8", "flash-fp8")
    for purpose in ("generate", "train"):
        assert main(["info", str(path), "--parallel", "tp=2", "--for", purpose]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "tp=2 cuts the 128x128 FP8 weight blocks" in err
    # the same split of BF16 weights has no blocks to cut
    assert _info([str(path), "--parallel", "tp=2", "--weights-dtype", "bf16"], capsys)["parallel"]["world_size"] == 2


# --- against real ranks --------------------------------------------------------------------------

# 510 embedding rows split unevenly over 2 ranks: FSDP's padding (the first rank holds the larger part)
LAYOUTS = [("dp_shard=2", {"vocab_size": 510}), ("dp_shard=2,ep=2", {}), ("tp=2", {}),
           ("pp=2", {"mtp_num_layers": 0})]


def _worker(jobs: list[dict]) -> None:
    import torch.distributed as dist

    from longcat.config import preset
    from longcat.model import build_model
    from longcat.parallel.engine import parallelize
    from longcat.parallel.layout import ParallelLayout, build_mesh, init_distributed, shutdown_distributed
    from longcat.parallel.sharded_init import shard_box

    init_distributed("cpu")
    for job in jobs:
        config = preset("tiny", **job["overrides"])
        dims = build_mesh(ParallelLayout.parse(job["layout"]), "cpu")
        pm = parallelize(build_model(config, device="meta"), dims, seq_len=16)
        held = sum(shard_box(p)[2].numel() for p in pm.module.parameters())
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, held)
        if dist.get_rank() == 0:
            Path(job["out"]).write_text(json.dumps(everyone))
        dist.barrier()
    shutdown_distributed()


@pytest.mark.slow
def test_each_rank_holds_the_parameters_info_says(tmp_path):
    """Two gloo ranks lay the meta-built tiny model out with `parallelize`: the larger rank of each
    layout holds exactly the parameters `info --parallel` prints (with pp, each pipeline rank its own)."""
    from longcat.config import preset
    from longcat.info import rank_parameters
    from longcat.parallel.launch import launch
    from longcat.parallel.layout import ParallelLayout

    jobs = [{"layout": layout, "overrides": overrides, "out": str(tmp_path / f"{i}.json")}
            for i, (layout, overrides) in enumerate(LAYOUTS)]
    proc = launch([str(Path(__file__).resolve()), json.dumps(jobs)], nproc=2, threads_per_rank=1, timeout=300,
                  capture=True)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for job in jobs:
        held = json.loads(Path(job["out"]).read_text())
        layout = ParallelLayout.parse(job["layout"])
        predicted = [r["parameters"] for r in rank_parameters(preset("tiny", **job["overrides"]), layout, "bf16")]
        if layout.pp > 1:
            assert held == predicted, job["layout"]  # pp rank r is global rank r here
        else:
            assert max(held) == predicted[0], job["layout"]


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
