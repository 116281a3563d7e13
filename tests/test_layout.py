"""One layout vocabulary for the planner and the runtime.

The planner's `parallel` strings parse and validate as `--parallel` layouts, its expert folding
is the runtime's (ep taken from dp_shard, experts whole on every TP rank), what the runtime would
run differently is stated in the result, and the planner's best layout for the tiny preset on 4
`cpu-local` chips trains on 4 gloo processes.
"""

from __future__ import annotations

import json
import math

import pytest

from longcat.cli import main
from longcat.config import ConfigError, preset
from longcat.parallel.layout import MESH_DIMS, ParallelLayout
from longcat.plan.arch import load_architecture
from longcat.plan.hardware import load_hardware, load_stack
from longcat.plan.layout import Layout, parse_layout
from longcat.plan.serve import ServeSetup, serve_plan
from longcat.plan.train import Planner, TrainSetup

TINY = ("plan", "train", "--model", "tiny", "--hardware", "cpu-local", "--chips", "4", "--seq-len", "32",
        "--global-batch-tokens", "512", "--top", "3", "--json")


def plan_json(capsys, *argv: str) -> dict:
    code = main(list(argv))
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def moe_planner(chips=64, stack="modern", **kw) -> Planner:
    return Planner(TrainSetup(load_architecture("flash"), load_hardware("h800"), load_stack(stack, kw), chips, 4096,
                              4096 * 256))


# --- the planner's output is the runtime's input ---------------------------------------------------------


def test_plan_parallel_strings_are_valid_runtime_layouts(capsys):
    data = plan_json(capsys, *TINY)
    config = preset("tiny")
    for plan in data["layouts"]:
        rt = plan["runtime"]
        assert plan["parallel"] == rt["parallel"] is not None
        layout = ParallelLayout.parse(plan["parallel"])
        assert str(layout) == plan["parallel"]
        assert plan["layout"].startswith(plan["parallel"] + ",zero=")
        # what `longcat train --parallel` checks before starting a process
        layout.validate(config, rt["nproc"], seq_len=rt["seq_len"], global_batch=rt["micro_batch"])
        assert rt["micro_batch"] * rt["grad_accum"] * rt["seq_len"] == plan["global_batch_tokens"]


def test_runnable_search_keeps_to_what_the_runtime_runs(capsys):
    data = plan_json(capsys, *TINY, "--runnable")
    for plan in data["layouts"]:
        assert plan["runtime"]["runs_as_planned"] and not plan["runtime"]["differs"]
        assert plan["layout_fields"]["zero"] == 3 and plan["layout_fields"]["recompute"] == "none"


def test_parallel_string_round_trips_through_layout(capsys):
    """A result's `parallel` string given back as --layout fixes the same degrees."""
    best = plan_json(capsys, *TINY)["layouts"][0]
    again = plan_json(capsys, *TINY, "--layout", best["parallel"])["layouts"][0]
    assert again["parallel"] == best["parallel"]
    full = f"{best['parallel']},zero=3,recompute=none,microbatch={best['layout_fields']['microbatch']}"
    if best["layout_fields"]["ep"] > 1:  # the expert all-to-all as the runtime runs it: not overlapped
        full += ",ep_schedule=none"
    one = plan_json(capsys, *TINY, "--layout", full)
    assert one["layout"] == full and one["runtime"]["runs_as_planned"]
    # every printed layout, given back whole, is evaluated as printed (planner-only fields included)
    again = plan_json(capsys, *TINY, "--layout", best["layout"])
    assert again["layout"] == best["layout"] and again["step_time_s"] == pytest.approx(best["step_time_s"])


def test_serve_plan_names_its_layout_or_why_not():
    arch, hw = load_architecture("longcat2"), load_hardware("ascend-910c")
    attention_dp = serve_plan(ServeSetup(arch, hw, chips=64, tp=1))
    assert attention_dp["parallel"] == "dp_replicate=1,dp_shard=64,ep=64,tp=1,cp=1,pp=1"
    ParallelLayout.parse(attention_dp["parallel"])
    spread = serve_plan(ServeSetup(arch, hw, chips=64, tp=8))  # experts over every chip, across TP ranks
    assert spread["parallel"] is None and "dp_shard" in spread["parallel_rejected"][0]
    grouped = serve_plan(ServeSetup(arch, hw, chips=64, tp=8, ep=8))
    assert grouped["parallel"] == "dp_replicate=1,dp_shard=8,ep=8,tp=8,cp=1,pp=1"


# --- one vocabulary, aliases, errors --------------------------------------------------------------------


def test_layout_names_and_aliases():
    assert parse_layout("dp_shard=8,ep=4,pp=2,pp_schedule=interleaved,pp_stages_per_rank=2,zero=3") == {
        "dp_shard": 8, "ep": 4, "pp": 2, "pp_schedule": "interleaved", "pp_stages_per_rank": 2, "zero": 3}
    assert parse_layout("schedule=interleaved:3,vpp=3,mbs=2,dp=16") == {
        "pp_schedule": "interleaved", "pp_stages_per_rank": 3, "microbatch": 2, "dp": 16}
    with pytest.raises(ConfigError, match=r"unknown --layout key 'foo'; valid: dp_replicate, dp_shard, ep, tp.*zero"):
        parse_layout("foo=1")
    with pytest.raises(ConfigError, match="pp_schedule must be one of 1f1b, interleaved, gpipe"):
        parse_layout("pp_schedule=zigzag")
    # `dp` is split the way the ZeRO stage implies: zero 0 replicates, otherwise every data rank shards
    assert Layout(tp=8, dp=16, zero=0).parallel == ParallelLayout(dp_replicate=16, tp=8)
    assert Layout(dp=16, ep=4, zero=0).parallel == ParallelLayout(dp_shard=4, dp_replicate=4, ep=4)
    assert Layout(dp=16, ep=4, zero=1).parallel == ParallelLayout(dp_shard=16, ep=4)
    assert Layout(dp=16, dp_replicate=2).parallel == ParallelLayout(dp_shard=8, dp_replicate=2)
    L = Layout(dp_shard=8, ep=4, tp=2, pp=2, zero=3)
    assert L.chips == 32 and L.dp == 8 and L.shard_group == 8 and L.expert_shard_group == 2
    assert hash(L) == hash(Layout(parallel=L.parallel, zero=3))


def test_layout_errors_in_the_cli_name_the_fix(capsys):
    assert main([*TINY[:-1], "--layout", "dp_shard=3,ep=2"]) == 2
    err = capsys.readouterr().err
    assert "ep=2 must divide dp_shard=3" in err and "Traceback" not in err


# --- the folding --------------------------------------------------------------------------------------------


def test_experts_fold_like_the_runtime():
    """ep comes out of dp_shard; experts are whole on every TP rank; ZeRO shards them over dp_shard/ep*cp."""
    p = moe_planner(chips=64)
    assert any("ep=16 must divide dp_shard=8" in e for e in p.check(Layout(tp=8, dp_shard=8, ep=16)))
    for L in (Layout(tp=1, dp_shard=64, ep=8, zero=3), Layout(tp=4, dp_shard=16, ep=8, zero=3),
              Layout(tp=2, dp_shard=16, dp_replicate=2, ep=4, zero=3)):
        dense, experts, ngram = p._stage_params(L, p.s.arch.num_layers, 0)["only"]
        all_experts = p.layer_expert_params * p.s.arch.num_layers + p.mtp_expert
        assert experts == pytest.approx(all_experts / L.ep)  # not divided by tp
        plan = p.evaluate(L)
        w = 2.0  # bf16 weights
        assert plan.memory["weights"] == pytest.approx(
            w * (dense / (L.dp_shard * L.cp) + experts / (L.dp_shard // L.ep * L.cp) + ngram))
        assert plan.runtime["parallel"] == str(L.parallel)
    # the planner's group strides (ep and the dense shard group tp apart, cp and the expert shard
    # group tp*ep apart) follow the runtime's mesh order, outermost first
    assert MESH_DIMS == ("pp", "dp_replicate", "dp_shard_mod_ep", "cp", "ep", "tp")
    # with tp=8 filling a domain of 8, the ep ranks (tp apart) are all outside it
    assert p._a2a_time(1e6, 1024, 8, 8) > p._a2a_time(1e6, 1024, 8, 1)


def test_runtime_differences_are_stated():
    p = moe_planner(chips=64, sequence_parallel=False)
    zero1 = p.runtime(Layout(dp_shard=64, ep=8, zero=1))
    assert zero1["parallel"] and not zero1["runs_as_planned"] and "zero=1" in zero1["differs"][0]
    full = p.runtime(Layout(dp_shard=64, ep=8, zero=3, recompute="full"))
    assert "recompute=full" in full["differs"][0]
    assert p.runtime(Layout(dp_shard=64, ep=8, zero=3))["runs_as_planned"]
    # degrees the runtime rejects give no string, and say why
    layers = p.s.arch.num_layers
    uneven = next(k for k in range(2, layers) if layers % k)
    rejected = p.runtime(Layout(pp=uneven, dp_shard=64 // uneven // 2 * 2, zero=3))
    assert rejected["parallel"] is None and f"must divide the {layers} layers" in rejected["rejected"][0]
    both = p.runtime(Layout(tp=2, cp=2, dp_shard=16, zero=3))
    assert both["parallel"] is None and any("tp > 1 with cp > 1" in r for r in both["rejected"])
    sp = moe_planner(chips=64).runtime(Layout(tp=2, dp_shard=32, ep=8, zero=3))
    assert any("sequence parallelism" in d for d in sp["differs"])


# --- the planner's pick, trained for real --------------------------------------------------------------------


@pytest.mark.slow
def test_planner_best_layout_trains_on_four_gloo_ranks(capsys, tmp_path):
    best = plan_json(capsys, *TINY)["layouts"][0]
    rt = best["runtime"]
    assert rt["parallel"] is not None and rt["nproc"] == 4
    summary_path = tmp_path / "summary.json"
    code = main(["parallel", "check", "--nproc", str(rt["nproc"]), "--parallel", rt["parallel"],
                 "--batch", str(rt["micro_batch"]), "--seq-len", str(rt["seq_len"]), "--steps", "2",
                 "--json", str(summary_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    losses = json.loads(summary_path.read_text())["losses"]
    assert set(losses) >= {"1", "2"} and all(math.isfinite(v) for v in losses.values())
