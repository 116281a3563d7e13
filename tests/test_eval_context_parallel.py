"""Context-parallel prefill inside the engine and `longcat eval longctx --nproc 2`: the same greedy
tokens and the same evaluation as one process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from longcat.cli import main
from longcat.config import preset
from longcat.infer.engine import Engine
from longcat.infer.sampling import GenerationError, SamplingParams
from longcat.model import build_model
from longcat.parallel.launch import launch

# both longer than tiny's index_topk (24): LSA selects during the prefill and the decode
PROMPT_LENGTHS = (301, 150)
NEW_TOKENS = 8

WORKER = textwrap.dedent(
    """
    import functools, json, sys
    import torch
    import torch.distributed as dist
    from longcat.config import preset
    from longcat.infer.engine import Engine
    from longcat.infer.sampling import SamplingParams
    from longcat.model import build_model
    from longcat.parallel.cp_prefill import prefill_context_parallel
    from longcat.parallel.layout import init_distributed, shutdown_distributed

    out = sys.argv[1]
    lengths = [int(n) for n in sys.argv[2].split(",")]
    init_distributed("cpu")
    torch.set_num_threads(1)
    model = build_model(preset("tiny"), seed=0).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    engine = Engine(model, max_seq_len=max(lengths) + 16, prefill_fn=functools.partial(prefill_context_parallel))
    results = engine.generate(prompts, SamplingParams(max_new_tokens=int(sys.argv[3]), temperature=0.0,
                                                      ignore_eos=True))
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump([r.token_ids for r in results], f)
    shutdown_distributed()
    """
)


def _one_process() -> list[list[int]]:
    model = build_model(preset("tiny"), seed=0).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    engine = Engine(model, max_seq_len=max(PROMPT_LENGTHS) + 16, prefill_chunk=64)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    return [r.token_ids for r in results]


@pytest.mark.slow
def test_engine_with_context_parallel_prefill_matches_one_process(tmp_path: Path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = launch([str(worker), str(tmp_path), ",".join(map(str, PROMPT_LENGTHS)), str(NEW_TOKENS)], nproc=2,
                  threads_per_rank=1, timeout=300, capture=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    reference = _one_process()
    assert all(len(t) == NEW_TOKENS for t in reference)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == reference


def test_prefill_fn_refuses_speculative_decoding():
    model = build_model(preset("tiny"), seed=0).eval()
    with pytest.raises(GenerationError, match="speculative decoding needs the engine's own prefill"):
        Engine(model, prefill_fn=lambda *a: None, speculative=1)
    engine = Engine(model, prefill_fn=lambda *a: None)
    with pytest.raises(GenerationError, match="speculative decoding needs"):
        engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2), speculative=1)


@pytest.mark.slow
def test_eval_longctx_on_two_ranks_matches_one_process(tiny_jsonl_run, tmp_path: Path, capsys):
    run, corpus = tiny_jsonl_run
    common = ["eval", "longctx", "--model", str(run), "--data", str(corpus), "--tasks", "passkey",
              "--lengths", "300,500", "--depths", "0,1", "--samples", "2", "--ppl-windows", "3", "--threads", "1"]
    capsys.readouterr()
    assert main([*common, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    out = tmp_path / "cp"
    # the user's command line: `--nproc 2` relaunches itself under torchrun
    proc = subprocess.run([sys.executable, "-m", "longcat.cli", *common, "--nproc", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    parallel = json.loads((out / "longctx.json").read_text())
    assert parallel["setup"]["ranks"] == 2 and parallel["setup"]["prefill"] == "context-parallel"
    assert single["setup"]["ranks"] == 1
    assert parallel["accuracy"] == single["accuracy"]
    for a, b in zip(parallel["perplexity"], single["perplexity"], strict=True):
        assert a["context"] == b["context"] and a["windows"] == b["windows"] == 3
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
