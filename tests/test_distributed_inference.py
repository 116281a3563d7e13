"""Distributed inference (`longcat.parallel.inference`): generation with tensor-parallel attention
and dense FFNs and expert-parallel experts over real gloo ranks gives, token for token, what one
process gives, from published-layout BF16 and FP8 checkpoints, plain and MTP speculative.

Run as a script under torchrun (the tests below do that), this file is the worker: for each job in
its JSON argument it loads the checkpoint sharded for the job's layout, generates greedily with the
ordinary `Engine`, checks that every rank produced the same tokens, and rank 0 writes the tokens
and the bytes each rank holds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# two prompts of different lengths: batched decoding with rows at different positions
PROMPTS = [[1, 17, 42, 99, 7, 300, 12], [1, 5, 250]]
NEW_TOKENS = 10
SPECULATIVE = 2
LONG_PROMPTS = [list(range(3, 43)), [1, 5, 250]]


def _generate(model, speculative: int, prompts=PROMPTS) -> list[list[int]]:
    from longcat.infer import Engine, SamplingParams

    engine = Engine(model, max_seq_len=64)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in engine.generate(prompts, params, speculative=speculative)]


def _worker(jobs: list[dict]) -> None:
    import torch.distributed as dist

    import longcat
    from longcat.parallel.inference import load_for_inference, local_bytes, setup_inference, shard_for_inference
    from longcat.parallel.layout import shutdown_distributed
    from longcat.interop.loader import load_model_config

    for job in jobs:
        config = load_model_config(job["model"])
        ranks = setup_inference(job["layout"], config, weights_dtype=job.get("weights_dtype"))
        dtype = getattr(torch, job["dtype"]) if job.get("dtype") else None
        if job.get("cut_loaded"):  # a model loaded whole, then cut to this rank's shards
            model = shard_for_inference(longcat.load(job["model"], dtype=dtype).eval(), ranks)
        else:
            model = load_for_inference(job["model"], ranks, dtype=dtype, weights_dtype=job.get("weights_dtype"))
        prompts = job.get("prompts", PROMPTS)
        out = {"plain": _generate(model, 0, prompts), "bytes": local_bytes(model)}
        if model.mtp:
            out["speculative"] = _generate(model, SPECULATIVE, prompts)
        everything: list = [None] * dist.get_world_size()
        dist.all_gather_object(everything, out)
        if dist.get_rank() == 0:
            Path(job["out"]).write_text(json.dumps(everything))
        dist.barrier()
    shutdown_distributed()


def _launch(tmp_path: Path, nproc: int, jobs: list[dict]) -> list[list[dict]]:
    from longcat.parallel.launch import launch

    for i, job in enumerate(jobs):
        job["out"] = str(tmp_path / f"job{i}.json")
    proc = launch([str(Path(__file__).resolve()), json.dumps(jobs)], nproc=nproc, threads_per_rank=1,
                  timeout=300, capture=True)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return [json.loads(Path(job["out"]).read_text()) for job in jobs]


def _one_process(path: Path, dtype: str | None = None, weights_dtype: str | None = None, prompts=PROMPTS) -> dict:
    import longcat

    model = longcat.load(path, dtype=getattr(torch, dtype) if dtype else None, weights_dtype=weights_dtype).eval()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    out = {"plain": _generate(model, 0, prompts),
           "tensor_bytes": {n: t.numel() * t.element_size() for n, t in tensors.items()}}
    if model.mtp:
        out["speculative"] = _generate(model, SPECULATIVE, prompts)
    return out


# --------------------------------------------------------------------------------------------------
# the tests

# name -> (checkpoint, layout, compute dtype, weights_dtype[, prompts[, worker options]]). Where a test computes in fp32, it is
# because bf16 rounds the ranks' partial sums differently from one process's single sum, and a
# near-tie between two logits may then go either way; "as stored" jobs run in the checkpoint's bf16.
TWO_RANK_JOBS = {
    "bf16-tp2-ep2-as-stored": ("flash", "tp=2,ep=2", None, None),
    "bf16-tp2": ("flash", "tp=2", "float32", None),
    "bf16-ep2": ("flash", "ep=2", "float32", None),
    "fp8-dequantized-tp2-ep2": ("flash-fp8", "tp=2,ep=2", "float32", None),
    "fp8-resident-ep2-as-stored": ("flash-fp8", "ep=2", None, "fp8"),
    "fp8-resident-tp2-ep2": ("fp8-tp", "tp=2,ep=2", "float32", "fp8"),
    "bf16-tp2-ep2-cut-after-loading": ("flash", "tp=2,ep=2", "float32", None, PROMPTS, {"cut_loaded": True}),
    # LongCat-2.0: n-gram embeddings, 3 MTP heads, and LSA selecting (the long prompt outgrows index_topk)
    "longcat2-lsa-tp2-ep2": ("longcat2", "tp=2,ep=2", "float32", None, LONG_PROMPTS),
}
FOUR_RANK_JOBS = {
    "bf16-tp2-ep4": ("flash", "tp=2,ep=4", "float32", None),
    "fp8-resident-ep4-as-stored": ("flash-fp8", "ep=4", None, "fp8"),
}
# weights each layout cuts: the dense ones along tp, the experts along ep (FP8 scales with them)
TP_SPLIT = re.compile(r"\.(q_b_proj|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")
EP_SPLIT = re.compile(r"\.experts\.")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from longcat.testing import write_published

    root = tmp_path_factory.mktemp("published")
    return {
        "flash": write_published(root / "flash", "flash"),
        "flash-fp8": write_published(root / "flash-fp8", "flash-fp8"),
        "longcat2": write_published(root / "longcat2", "longcat2"),
        # FP8-resident weights split by tensor parallelism need whole 128x128 blocks per rank
        "fp8-tp": write_published(root / "fp8-tp", "flash-fp8", num_attention_heads=4, qk_nope_head_dim=64,
                                  qk_rope_head_dim=64, v_head_dim=64, ffn_hidden_size=256),
    }


@pytest.fixture(scope="module")
def one_process(checkpoints):
    cached = {}

    def result(checkpoint: str, dtype, weights_dtype, prompts=PROMPTS) -> dict:
        key = (checkpoint, dtype, weights_dtype, json.dumps(prompts))
        if key not in cached:
            cached[key] = _one_process(checkpoints[checkpoint], dtype, weights_dtype, prompts)
        return cached[key]

    return result


def _jobs(checkpoints, table: dict) -> list[dict]:
    return [{"model": str(checkpoints[c]), "layout": layout, "dtype": dtype, "weights_dtype": wd,
             "prompts": (rest or [PROMPTS])[0], **(rest[1] if len(rest) > 1 else {})}
            for c, layout, dtype, wd, *rest in table.values()]


@pytest.fixture(scope="module")
def two_rank_results(checkpoints, tmp_path_factory):
    results = _launch(tmp_path_factory.mktemp("two"), 2, _jobs(checkpoints, TWO_RANK_JOBS))
    return dict(zip(TWO_RANK_JOBS, results))


def _expected_rank_bytes(reference: dict, layout: str) -> int:
    from longcat.parallel.layout import ParallelLayout

    parsed = ParallelLayout.parse(layout)
    total = 0
    for name, nbytes in reference["tensor_bytes"].items():
        if parsed.tp > 1 and TP_SPLIT.search(name) and not EP_SPLIT.search(name):
            nbytes //= parsed.tp
        elif parsed.ep > 1 and EP_SPLIT.search(name):
            nbytes //= parsed.ep
        total += nbytes
    return total


def _assert_matches(ranks: list[dict], reference: dict, layout: str) -> None:
    for rank, got in enumerate(ranks):
        assert got["plain"] == reference["plain"], f"rank {rank}: greedy tokens differ from one process"
        assert got.get("speculative") == reference["speculative"], f"rank {rank}: speculative tokens differ"
        # each rank holds exactly its shards: the split weights divided, the rest whole
        assert got["bytes"] == _expected_rank_bytes(reference, layout), f"rank {rank} holds more than its shard"
    assert reference["speculative"] == reference["plain"]  # greedy MTP speculation changes nothing


@pytest.mark.parametrize("name", list(TWO_RANK_JOBS))
def test_two_ranks_generate_what_one_process_does(two_rank_results, one_process, name):
    checkpoint, layout, dtype, weights_dtype, *rest = TWO_RANK_JOBS[name]
    _assert_matches(two_rank_results[name], one_process(checkpoint, dtype, weights_dtype, *rest[:1]), layout)


@pytest.mark.slow
def test_four_ranks_generate_what_one_process_does(checkpoints, one_process, tmp_path):
    results = _launch(tmp_path, 4, _jobs(checkpoints, FOUR_RANK_JOBS))
    for (checkpoint, layout, dtype, weights_dtype), ranks in zip(FOUR_RANK_JOBS.values(), results):
        _assert_matches(ranks, one_process(checkpoint, dtype, weights_dtype), layout)


@pytest.mark.slow
def test_generate_command_on_two_processes(checkpoints, one_process):
    """`longcat generate --nproc 2` end to end: torchrun, sharded load, rank 0 prints the results."""
    cmd = [sys.executable, "-m", "longcat.cli", "generate", "--nproc", "2", "--parallel", "tp=2,ep=2",
           "--model", str(checkpoints["flash"]), "--temperature", "0", "--ignore-eos", "--json",
           "--max-new-tokens", str(NEW_TOKENS), "--speculative", str(SPECULATIVE), "--dtype", "float32"]
    for prompt in PROMPTS:
        cmd += ["--prompt-ids", ",".join(map(str, prompt))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["index"] for r in rows] == [0, 1]  # rank 0 alone prints
    assert [r["token_ids"] for r in rows] == one_process("flash", "float32", None)["plain"]


def _entry_point(argv: list[str], capsys) -> tuple[int, str]:
    from longcat.infer.__main__ import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--parallel", "pp=2"], "pp=2: not supported for inference"),
    (["--parallel", "dp_shard=2"], "dp_shard=2: not supported for inference"),
    (["--parallel", "tp=4"], "set --nproc 4"),
    (["--parallel", "tp=2,ep=3"], "the smaller degree must divide the larger"),
    (["--parallel", "tp=2,ep=2", "--compile"], "--compile is not supported with several processes"),
])
def test_bad_parallel_generation_is_refused_before_any_process_starts(checkpoints, capsys, extra, message):
    code, err = _entry_point(["--nproc", "2", "--model", str(checkpoints["flash"]), "--prompt-ids", "1,2", *extra],
                             capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("longcat generate: error:") and message in line, err


def test_layouts_that_do_not_divide_the_model_name_the_degree():
    from longcat.config import ConfigError, preset
    from longcat.parallel.layout import ParallelLayout

    config = preset("tiny")  # 4 heads, 8 routed experts
    heads, experts = config.num_attention_heads, config.n_routed_experts
    with pytest.raises(ConfigError, match=f"tp={2 * heads} must divide num_attention_heads={heads}"):
        ParallelLayout.parse(f"tp={2 * heads}").validate_inference(config, 2 * heads)
    bad_ep = next(e for e in range(2, 2 * experts) if experts % e)
    with pytest.raises(ConfigError, match=f"ep={bad_ep} must divide the {experts} routed experts"):
        ParallelLayout.parse(f"ep={bad_ep}").validate_inference(config, bad_ep)
    ParallelLayout.parse("tp=2,ep=2").validate_inference(config, 2)  # ep over the same ranks as tp
    ParallelLayout.parse("tp=2,ep=4").validate_inference(config, 4)


def test_fp8_blocks_a_tensor_parallel_split_would_cut_are_refused(checkpoints):
    from longcat.config import ConfigError
    from longcat.model.fp8 import BLOCK
    from longcat.parallel.layout import ParallelLayout
    from longcat.parallel.sharded_load import load_config

    config = load_config(checkpoints["flash-fp8"])  # 2 heads of 32+32: a rank's kv_b_proj rows are 64
    with pytest.raises(ConfigError, match=r"tp=2 cuts the 128x128 FP8 weight blocks .* valid tp: \[1\]"):
        ParallelLayout.parse("tp=2").validate_inference(config, 2, fp8_block=BLOCK)
    ParallelLayout.parse("ep=2").validate_inference(config, 2, fp8_block=BLOCK)  # experts split whole
    ParallelLayout.parse("tp=2").validate_inference(load_config(checkpoints["fp8-tp"]), 2, fp8_block=BLOCK)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
