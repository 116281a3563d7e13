"""`longcat convert --to fp8|bf16|fp32`: block quantization (amax/448 per 128x128 block) and
dequantization of published checkpoints, streamed key by key into sharded safetensors with an
index; round trips; `--check` numerics on a trained model; no half-written output on failure."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from longcat.cli import main
from longcat.config import preset
from longcat.interop import cli as convert_cli
from longcat.interop.hf import save_hf
from longcat.interop.loader import load
from longcat.model import build_model, lm_losses
from longcat.testing import write_published


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_fp8_to_fp32_to_fp8_keeps_scales_and_bytes(tmp_path, capsys):
    src = write_published(tmp_path / "src", "longcat2-fp8")
    assert main(["convert", str(src), "--to", "fp32", str(tmp_path / "fp32"), "--shard-mb", "1"]) == 0
    assert main(["convert", str(tmp_path / "fp32"), "--to", "fp8", str(tmp_path / "back"), "--shard-mb", "1"]) == 0
    assert "LongCat-2.0" in capsys.readouterr().out
    for out in ("fp32", "back"):
        assert (tmp_path / out / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / out).glob("model-*-of-*.safetensors"))) > 1
    a, dense, b = _tensors(src), _tensors(tmp_path / "fp32"), _tensors(tmp_path / "back")
    assert not any(k.endswith("weight_scale_inv") for k in dense)
    assert dense["model.layers.0.mlp.experts.0.gate_proj.weight"].dtype == torch.float32
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LongcatCausalLM"]
    scales = [k for k in a if k.endswith("weight_scale_inv")]
    assert scales and set(scales) == {k for k in b if k.endswith("weight_scale_inv")}
    changed = total = 0
    for k in scales:
        assert torch.equal(a[k], b[k]), k
        w = k[: -len("_scale_inv")]
        changed += (a[w].view(torch.uint8) != b[w].view(torch.uint8)).sum().item()
        total += a[w].numel()
    assert changed <= 0.001 * total
    # what stays bf16 in the source (the indexer here) stays bf16, not quantized on the way back
    assert b["model.layers.0.self_attn.0.indexer.wq_b.weight"].dtype == torch.float32  # fp32 copy, never quantized
    assert load(tmp_path / "back").config == load(src).config


def test_bf16_to_fp8_quantizes_each_block_by_its_amax(tmp_path):
    src = write_published(tmp_path / "src", "flash")
    assert main(["convert", str(src), "--to", "fp8", str(tmp_path / "fp8")]) == 0
    a, b = _tensors(src), _tensors(tmp_path / "fp8")
    w = a["model.layers.1.self_attn.1.kv_a_proj_with_mqa.weight"].float()  # (80, 192): blocks 80x128, 80x64
    q, s = b["model.layers.1.self_attn.1.kv_a_proj_with_mqa.weight"], b[
        "model.layers.1.self_attn.1.kv_a_proj_with_mqa.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and s.shape == (1, 2)
    assert torch.equal(s, torch.stack([w[:, :128].abs().amax(), w[:, 128:].abs().amax()]).view(1, 2) / 448)
    assert b["model.embed_tokens.weight"].dtype == torch.bfloat16  # embeddings, head, norms, router: bf16
    assert b["model.layers.0.mlp.router.classifier.weight"].dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    q_cfg = cfg["quantization_config"]
    assert q_cfg["quant_method"] == "fp8" and q_cfg["weight_block_size"] == [128, 128]
    assert "lm_head" in q_cfg["ignored_layers"]
    assert (load(tmp_path / "fp8").layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16)


def test_a_failed_convert_leaves_no_output(tmp_path, monkeypatch, capsys):
    src = write_published(tmp_path / "src", "flash")

    original = convert_cli.stream_published

    def failing(*args):  # the disk fills up after 20 tensors
        for i, item in enumerate(original(*args)):
            if i == 20:
                raise OSError("No space left on device")
            yield item

    monkeypatch.setattr(convert_cli, "stream_published", failing)
    with pytest.raises(OSError, match="No space"):
        main(["convert", str(src), "--to", "fp8", str(tmp_path / "out"), "--shard-mb", "1"])
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    # a corrupt source is refused before anything is written, in one line
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(["convert", str(src), "--to", "fp8", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err and shard.name in err
    assert not (tmp_path / "out").exists()


def _trained_tiny() -> torch.nn.Module:
    """A tiny model trained until its predictions are confident (each token is followed by the next
    one in the vocabulary): a random-init model's flat logits make top-1 agreement meaningless."""
    torch.manual_seed(0)
    V = 64
    model = build_model(preset("tiny", vocab_size=V, mtp_num_layers=0, index_n_heads=0, oe_vocab_size_ratio=0.0), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(25):
        start = torch.randint(0, V - 3, (8, 1), generator=g)
        seq = (start + torch.arange(25)) % (V - 3) + 3  # (8, 25)
        loss = lm_losses(model(seq[:, :-1], mtp=False), seq[:, 1:])["lm"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    return model.eval()


def test_check_reports_fp8_agreement_on_a_trained_model(tmp_path, capsys):
    save_hf(_trained_tiny(), tmp_path / "trained")
    assert main(["convert", str(tmp_path / "trained"), "--to", "fp8", str(tmp_path / "fp8"), "--check"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.search(r"mean KL ([0-9.e+-]+) nats, top-1 agreement ([0-9.]+)%", line)
    assert m, line
    assert float(m.group(1)) < 0.05 and float(m.group(2)) >= 98.0
