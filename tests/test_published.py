"""The published LongCat checkpoint layouts (DESIGN §8): tiny fixtures of all four families (BF16
and FP8) written by `longcat.testing` load, generate, match transformers where it has the family,
and put every tensor where it belongs (checked against the files, read here with safetensors'
own reader)."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from safetensors import safe_open

from longcat.infer import Engine, SamplingParams
from longcat.interop.loader import load
from longcat.testing import FIXTURE_FAMILIES, write_published

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {family: write_published(root / family, family, seed=i) for i, family in enumerate(FIXTURE_FAMILIES)}


def _file_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a fixture, read with safetensors' own reader (not ours)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(path / file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _dequantized(files: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A published weight as fp32: e4m3 times its block scale (DeepSeek-V3's rule, written out)."""
    w = files[key]
    if w.dtype != torch.float8_e4m3fn:
        return w.float()
    s = files[key[: -len("weight")] + "weight_scale_inv"]
    rows, cols = w.shape
    assert s.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    return w.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]


def test_fixtures_have_the_published_layout(fixtures):
    flash = _file_tensors(fixtures["flash"])
    assert "model_type" not in json.loads((fixtures["flash"] / "config.json").read_text())
    assert "model.mtp.layers.0.enorm.m.weight" in flash and "model.mtp.norm.weight" in flash
    assert "model.mtp.layers.0.transformer_layer.mlp.gate_proj.weight" in flash
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in flash
    assert "model.layers.0.mlp.experts.4.gate_proj.weight" not in flash  # identity experts: no tensors
    fp8 = _file_tensors(fixtures["flash-fp8"])
    w, s = fp8["model.layers.0.self_attn.0.kv_a_proj_with_mqa.weight"], fp8[
        "model.layers.0.self_attn.0.kv_a_proj_with_mqa.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(w.shape) == (80, 192) and tuple(s.shape) == (1, 2)  # partial blocks, nothing padded
    assert fp8["model.layers.0.mlp.experts.0.gate_proj.weight"].shape == (136, 192)
    assert fp8["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert fp8["model.layers.0.mlp.router.classifier.weight"].dtype == torch.bfloat16
    lc2 = json.loads((fixtures["longcat2-fp8"] / "config.json").read_text())
    assert lc2["model_type"] is None and lc2["rope_scaling"]["rope_type"] == "deepseek_yarn"
    assert "modules_to_not_convert" in lc2["quantization_config"]
    assert len(list(fixtures["longcat2"].glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize("family", FIXTURE_FAMILIES)
def test_every_family_loads_and_generates(fixtures, family):
    model = load(fixtures[family]).eval()
    c = model.config
    assert c.ngram_enabled == ("lite" in family or "longcat2" in family)
    assert c.lsa_enabled == family.startswith("longcat2")
    assert c.mtp_num_layers == (3 if family.startswith("longcat2") else 1)
    if family.startswith("longcat2"):
        assert c.yarn_factor == 4.0 and c.routed_scaling_factor == 9.0
    assert model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16  # FP8 dequantized by default
    engine = Engine(model)
    plain = engine.generate([[5, 6, 7, 8, 9]], GREEDY)[0]
    assert len(plain.token_ids) == GREEDY.max_new_tokens
    speculative = engine.generate([[5, 6, 7, 8, 9]], GREEDY, speculative=2)[0]
    assert speculative.token_ids == plain.token_ids  # the MTP heads draft; greedy output is unchanged
    resident = load(fixtures[family], weights_dtype="fp8").eval()
    assert resident.layers[0].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    tokens = Engine(resident).generate([[5, 6, 7, 8, 9]], GREEDY, speculative=2)[0].token_ids
    if family.endswith("fp8"):  # the stored e4m3 dequantized inside the products: the same bf16 weights
        assert tokens == plain.token_ids
    else:
        assert len(tokens) == GREEDY.max_new_tokens


def test_fp8_weights_are_dequantized_by_multiplying_the_block_scale(fixtures):
    files = _file_tensors(fixtures["longcat2-fp8"])
    model = load(fixtures["longcat2-fp8"], dtype=torch.float32)
    experts = model.layers[1].mlp.experts
    F = model.config.expert_ffn_hidden_size
    for j in range(model.config.n_routed_experts):
        p = f"model.layers.1.mlp.experts.{j}"
        assert torch.equal(experts.gate_up_proj[j, :F], _dequantized(files, f"{p}.gate_proj.weight"))
        assert torch.equal(experts.gate_up_proj[j, F:], _dequantized(files, f"{p}.up_proj.weight"))
        assert torch.equal(experts.down_proj[j], _dequantized(files, f"{p}.down_proj.weight"))
    attn = model.layers[0].self_attn[0]
    assert torch.equal(attn.kv_a_proj_with_mqa.weight,
                       _dequantized(files, "model.layers.0.self_attn.0.kv_a_proj_with_mqa.weight"))
    # the indexer is bf16 in this checkpoint although the format could quantize it: read per tensor
    assert files["model.layers.0.self_attn.0.indexer.wq_b.weight"].dtype == torch.bfloat16
    assert torch.equal(attn.indexer.wq_b.weight, files["model.layers.0.self_attn.0.indexer.wq_b.weight"].float())


@pytest.mark.parametrize("family", ["flash", "longcat2-fp8"])
def test_mtp_weights_land_in_our_mtp_heads(fixtures, family):
    files = _file_tensors(fixtures[family])
    model = load(fixtures[family], dtype=torch.float32)
    ours = model.state_dict()
    mapping = {"enorm.weight": "enorm.m.weight", "hnorm.weight": "hnorm.m.weight", "eh_proj.weight": "eh_proj.weight",
               "self_attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
               "self_attn.q_a_layernorm.weight": "self_attn.q_a_layernorm.weight",
               "mlp.down_proj.weight": "transformer_layer.mlp.down_proj.weight",
               "post_attention_layernorm.weight": "post_attention_layernorm.weight"}
    for d in range(model.config.mtp_num_layers):
        for name, published in mapping.items():
            expected = _dequantized(files, f"model.mtp.layers.{d}.{published}")
            assert torch.equal(ours[f"mtp.{d}.{name}"], expected), (d, name)
        norm = "model.mtp.norm.weight" if d == 0 else f"model.mtp.layers.{d}.norm.weight"
        assert torch.equal(ours[f"mtp.{d}.final_layernorm.weight"], files[norm].float())


def _transformers_copy(src, dst, files=None):
    """The same weights for transformers: its config needs model_type longcat_flash; an FP8 source
    is written out dequantized (transformers' FP8 path needs a GPU)."""
    from longcat.config import from_hf_config, to_hf_config

    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = to_hf_config(from_hf_config(raw))
    (dst / "config.json").write_text(json.dumps(cfg))
    if files is None:
        for f in src.glob("*.safetensors*"):
            os.symlink(f, dst / f.name)
        return
    from safetensors.torch import save_file

    dense = {k: _dequantized(files, k) if v.dtype == torch.float8_e4m3fn else v
             for k, v in files.items() if not k.endswith("weight_scale_inv")}
    save_file(dense, str(dst / "model.safetensors"))


@pytest.mark.parametrize("family", ["flash", "flash-fp8"])
def test_flash_logits_equal_transformers(fixtures, family, tmp_path):
    transformers = pytest.importorskip("transformers")
    from longcat.reference import transformers_wants_identity_rows

    if transformers_wants_identity_rows():
        pytest.skip("transformers < 5.25 does not read the published N-real-experts layout")
    src = fixtures[family]
    _transformers_copy(src, tmp_path / "tf", _file_tensors(src) if family.endswith("fp8") else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, info = transformers.LongcatFlashForCausalLM.from_pretrained(
            tmp_path / "tf", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"]
    ours = load(src, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.eval()(x).logits
        assert (ours(x).logits - expected).abs().max().item() < 1e-4
        if family.endswith("fp8"):  # FP8-resident weights, dequantized inside the products
            resident = load(src, weights_dtype="fp8", dtype=torch.float32).eval()
            assert (resident(x).logits - expected).abs().max().item() < 1e-4


_PEAK_RSS_SCRIPT = r"""
import json, sys
import psutil, torch
from longcat.interop.loader import load
weights_dtype = sys.argv[3] if len(sys.argv) > 3 else None
# the interpreter, torch and longcat with every code path of a load paged in: a tiny load first
warm = load(sys.argv[2], weights_dtype=weights_dtype)
del warm
baseline = psutil.Process().memory_info().rss
model = load(sys.argv[1], weights_dtype=weights_dtype)
final = sum(t.numel() * t.element_size() for t in model.state_dict().values())
# this process's own high-water mark (ru_maxrss would also count the RSS of the forking parent)
from longcat.telemetry import peak_rss
peak, counter = peak_rss()
assert counter == "VmHWM", counter
info = psutil.Process().memory_full_info()
print(json.dumps({"baseline": baseline, "final": final, "peak": peak, "after": info.rss, "after_shared": info.shared}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("family,weights_dtype,megabytes",
                         [("flash", None, 300), ("flash-fp8", "bf16", 300), ("flash-fp8", "fp8", 200)])
def test_peak_rss_of_a_load_stays_within_1_2x_the_model(family, weights_dtype, megabytes, tmp_path):
    """Tensor by tensor from memory maps: a load never holds a second copy of the weights."""
    import subprocess
    import sys

    path = write_published(tmp_path / family, family, target_bytes=megabytes * 2**20, max_shard_bytes=64 * 2**20,
                           hidden_size=512, ffn_hidden_size=1024, expert_ffn_hidden_size=1000)
    tiny = write_published(tmp_path / "tiny", family)
    args = [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path), str(tiny)] + ([weights_dtype] if weights_dtype else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["final"] > 100 * 2**20
    assert m["peak"] - m["baseline"] <= 1.2 * m["final"], m
