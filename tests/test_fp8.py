"""FP8 weights in memory (model/fp8.py): block-scaled e4m3 with scales multiplied in, the products
dequantizing inside (eager forward, the decode forward, the compiled decode step), half the bytes
of bf16, and `longcat.load(..., weights_dtype=...)` / `longcat generate --weights-dtype`."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import pytest
import torch

from longcat.config import preset
from longcat.infer import Engine, SamplingParams
from longcat.infer.step import DecodeStep
from longcat.interop.hf import save_hf
from longcat.interop.loader import load
from longcat.model import LatentCache, build_model
from longcat.model.fp8 import (FP8_DTYPE, dequantize_blockwise, dequantize_stacked, fp8_parameter_names, from_fp8_,
                               quantize_blockwise, to_fp8_)
from longcat.testing import write_published

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def _tiny(seed=0):
    model = build_model(preset("tiny"), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # clear argmax margins for greedy comparisons
    return model.eval()


def test_block_scales_partial_grid_and_multiplication():
    w = torch.randn(200, 300) * torch.linspace(0.1, 3.0, 300)
    q, s = quantize_blockwise(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.shape == (2, 3)  # ceil grid, nothing padded
    assert torch.equal(s[1, 2], w[128:, 256:].abs().amax() / 448)  # the partial last block's own amax
    back = dequantize_blockwise(q, s)
    expanded = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    assert torch.equal(back, q.float() * expanded)
    # e4m3: half an ulp of 3 mantissa bits, or of the subnormal spacing 2^-9 (times the block scale)
    assert ((back - w).abs() <= w.abs() * 2**-4 + expanded * 2**-10 + 1e-7).all()
    with pytest.raises(ValueError, match="scale grid"):
        dequantize_blockwise(q, s[:, :2])
    # gate and up stacked: each on its own grid (136 rows is not a multiple of 128)
    gate, up = torch.randn(136, 192), torch.randn(136, 192) * 5
    (qg, sg), (qu, su) = quantize_blockwise(gate), quantize_blockwise(up)
    stacked = dequantize_stacked(torch.cat([qg, qu]), torch.cat([sg, su]), 2, torch.float32)
    assert torch.equal(stacked, torch.cat([dequantize_blockwise(qg, sg), dequantize_blockwise(qu, su)]))


def test_fp8_resident_model_equals_its_dequantized_twin_at_half_the_bytes():
    resident = to_fp8_(_tiny())
    names = fp8_parameter_names(resident)
    assert "layers.0.mlp.experts.gate_up_proj" in names and "layers.0.self_attn.0.kv_b_proj.weight" in names
    assert "lm_head.weight" not in names and "embed_tokens.weight" not in names
    assert "layers.0.mlp.router.classifier.weight" not in names
    params = dict(resident.named_parameters())
    assert all(params[n].dtype == FP8_DTYPE for n in names)
    twin = from_fp8_(to_fp8_(_tiny()), torch.float32)  # the same values, dequantized once
    fp8_bytes = sum(params[n].numel() for n in names)
    scales = sum(b.numel() * 4 for n, b in resident.named_buffers() if n.endswith("_scale_inv"))
    assert scales < 0.05 * fp8_bytes  # one fp32 per 128x128 block (tiny shapes: partial blocks)
    x = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = resident(x, mtp=True), twin(x, mtp=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.mtp_logits[0], b.mtp_logits[0], atol=1e-5, rtol=1e-5)
    # decode over the latent cache, plain and speculative (MTP heads with FP8 weights)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    expected = [r.token_ids for r in Engine(twin).generate(prompts, GREEDY)]
    assert [r.token_ids for r in Engine(resident).generate(prompts, GREEDY)] == expected
    assert [r.token_ids for r in Engine(resident).generate(prompts, GREEDY, speculative=2)] == expected


def test_load_weights_dtype(tmp_path):
    path = write_published(tmp_path / "fp8", "flash-fp8")
    files = {}
    from safetensors import safe_open

    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            files.update({k: h.get_tensor(k) for k in h.keys()})
    resident = load(path, weights_dtype="fp8")
    experts = resident.layers[0].mlp.experts
    F = resident.config.expert_ffn_hidden_size
    R = math.ceil(F / 128)
    # copied as stored: same e4m3 bytes, same scales
    assert torch.equal(experts.gate_up_proj[2, F:].view(torch.uint8),
                       files["model.layers.0.mlp.experts.2.up_proj.weight"].view(torch.uint8))
    assert torch.equal(experts.gate_up_proj_scale_inv[2, R:], files["model.layers.0.mlp.experts.2.up_proj.weight_scale_inv"])
    assert resident.embed_tokens.weight.dtype == torch.bfloat16
    assert resident.layers[0].mlp.router.classifier.weight.dtype == torch.float32
    for weights_dtype, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        dense = load(path, weights_dtype=weights_dtype)
        assert {p.dtype for n, p in dense.named_parameters() if "router" not in n} == {dtype}
    # a BF16 checkpoint is quantized on load; bytes of the FP8-resident weights are half of bf16
    bf16 = write_published(tmp_path / "bf16", "flash")
    a, b = load(bf16), load(bf16, weights_dtype="fp8")
    size = lambda m, n: sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if k.endswith(n))  # noqa: E731
    assert size(b, "experts.gate_up_proj") * 2 == size(a, "experts.gate_up_proj")
    # quantized on load exactly as to_fp8_ quantizes the loaded model
    again = to_fp8_(load(bf16))
    assert all(torch.equal(t.view(torch.uint8) if t.dtype == FP8_DTYPE else t, again.state_dict()[k].view(torch.uint8)
                           if t.dtype == FP8_DTYPE else again.state_dict()[k]) for k, t in b.state_dict().items())
    with pytest.raises(Exception, match="weights_dtype"):
        load(bf16, weights_dtype="int4")


def test_generate_cli_weights_dtype(tmp_path, capsys):
    from longcat.cli import main

    model = _tiny()
    save_hf(model, tmp_path / "m")
    outputs = []
    for weights_dtype in ("fp32", "fp8"):
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "5",
                     "--temperature", "0", "--ignore-eos", "--json", "--weights-dtype", weights_dtype]) == 0
        outputs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert len(outputs[1]["token_ids"]) == 5


needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler for torch.compile (inductor) on this machine")


@pytest.mark.slow
@needs_compiler
def test_compiled_decode_step_with_fp8_weights():
    """The compiled decode step dequantizes inside its graph: same logits as the eager step."""
    # one layer, no n-grams or LSA: a small graph to compile (the features have their own compiled tests)
    model = to_fp8_(build_model(preset("tiny", num_layers=1, oe_vocab_size_ratio=0.0, index_n_heads=0,
                                       mtp_num_layers=0), seed=0).eval())
    c = model.config
    ids = torch.randint(3, c.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        caches = []
        for _ in range(2):
            cache = LatentCache(c, 2, 32)
            model(ids, cache=cache, mtp=False, indexer_loss=False)
            caches.append(cache)
        positions = torch.tensor([[9], [9]])
        step = torch.randint(3, c.vocab_size, (2, 1), generator=torch.Generator().manual_seed(4))
        compiled, eager = DecodeStep(model, compile=True), DecodeStep(model)
        outs = [runner.forward(step, positions, cache) for runner, cache in zip((compiled, eager), caches)]
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=1e-4)


def test_training_from_an_fp8_checkpoint_starts_from_dequantized_weights(tmp_path):
    model = load(write_published(tmp_path / "fp8", "flash-fp8"), dtype=torch.float32)
    assert not fp8_parameter_names(model) & {n for n, p in model.named_parameters() if p.dtype == FP8_DTYPE}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    model.train()
    x = torch.randint(3, 512, (2, 12))
    out = model(x)
    out.logits.float().logsumexp(-1).mean().backward()
    assert model.layers[0].mlp.experts.down_proj.grad is not None


def test_fp8_grouped_experts_dequantize_a_range_of_experts_at_a_time(monkeypatch):
    """Prefill's grouped GEMM on FP8-resident experts: the same result whatever range of experts is
    dequantized at once (one expert, three, all)."""
    import longcat.model.moe as moe
    from longcat.model.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(8, 192, 136)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    to_fp8_(experts)
    twin = from_fp8_(copy.deepcopy(experts), torch.float32)  # the same values, dequantized once
    counts = torch.tensor([3, 0, 5, 1, 0, 0, 4, 2])
    x = torch.randn(int(counts.sum()), 192)
    with torch.no_grad():
        expected = twin(x, counts)
        for budget in (1, 3 * 136 * 192 * 4 * 3, 1 << 30):
            monkeypatch.setattr(moe, "DEQUANTIZED_EXPERT_BYTES", budget)
            assert torch.equal(experts(x, counts), expected), budget
