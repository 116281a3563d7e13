"""Context-parallel prefill: a prompt prefilled over 2 and 4 gloo ranks gives one process's logits and cache."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from longcat.config import preset
from longcat.model import LatentCache, build_model
from longcat.parallel.launch import launch

PROMPT_LEN = 301  # > index_topk (LSA selects), odd (the last rank's slice is short)

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from longcat.config import preset
    from longcat.model import LatentCache, build_model
    from longcat.parallel.cp_prefill import prefill_context_parallel
    from longcat.parallel.layout import init_distributed

    out, n = sys.argv[1], int(sys.argv[2])
    init_distributed("cpu")
    torch.set_num_threads(1)
    config = preset("tiny")
    model = build_model(config, seed=0).eval()
    prompt = torch.randint(3, config.vocab_size, (n,), generator=torch.Generator().manual_seed(5))
    cache = LatentCache(config, 1, n + 8, with_mtp=False)
    logits = prefill_context_parallel(model, prompt, cache)
    rank = dist.get_rank()
    torch.save({"logits": logits, "c_kv": cache.c_kv[:, :, :n], "k_rope": cache.k_rope[:, :, :n],
                "index_k": cache.index_k[:, :, :n]}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _single_process(n: int) -> dict:
    config = preset("tiny")
    model = build_model(config, seed=0).eval()
    prompt = torch.randint(3, config.vocab_size, (n,), generator=torch.Generator().manual_seed(5))
    cache = LatentCache(config, 1, n + 8, with_mtp=False)
    with torch.inference_mode():
        logits = model(prompt.unsqueeze(0), cache=cache, mtp=False, indexer_loss=False, logits_to_keep=1).logits[:, -1]
    return {"logits": logits, "c_kv": cache.c_kv[:, :, :n], "k_rope": cache.k_rope[:, :, :n],
            "index_k": cache.index_k[:, :, :n]}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_context_parallel_prefill_matches_one_process(tmp_path: Path, ranks: int):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = launch([str(worker), str(tmp_path), str(PROMPT_LEN)], nproc=ranks, threads_per_rank=1, timeout=300,
                  capture=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    reference = _single_process(PROMPT_LEN)
    for rank in range(ranks):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["logits"], reference["logits"], atol=1e-4, rtol=1e-4)
        for key in ("c_kv", "k_rope", "index_k"):
            torch.testing.assert_close(got[key], reference[key], atol=1e-5, rtol=1e-5)
