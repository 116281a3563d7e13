"""`longcat info CHECKPOINT`: the family, dtypes, FP8 block grid and bytes per component of a
published checkpoint, from its headers; the in-memory figures equal what `longcat.load` allocates."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from longcat.cli import main
from longcat.interop.loader import load
from longcat.testing import write_published


def _info(path, capsys) -> dict:
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family,label", [("longcat2-fp8", "LongCat-2.0-FP8"), ("flash-lite", "LongCat-Flash-Lite")])
def test_info_of_a_published_checkpoint(family, label, tmp_path, capsys):
    path = write_published(tmp_path / family, family)
    info = _info(path, capsys)
    ck = info["checkpoint"]
    assert ck["family"] == label
    on_disk = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            on_disk += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
    assert ck["disk_bytes"]["total"] == on_disk
    assert ck["shards"] == len(list(path.glob("*.safetensors"))) > 1
    if family.endswith("fp8"):
        assert "float8_e4m3fn" in ck["bytes_by_dtype"] and ck["fp8"]["tensors_with_partial_blocks"] > 0
        assert ck["fp8"]["kept_unquantized"]  # modules_to_not_convert
    else:
        assert ck["fp8"]["tensors"] == 0 and set(ck["bytes_by_dtype"]) == {"bfloat16"}
    for weights_dtype in ("fp8", "bf16", "fp32"):
        model = load(path, weights_dtype=weights_dtype)
        allocated = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert ck["memory_bytes"][weights_dtype]["total"] == allocated, weights_dtype
    assert ck["memory_bytes"]["fp8"]["experts"] * 2 < ck["memory_bytes"]["bf16"]["experts"] * 1.1
    assert info["total_params"] > 0  # the parameter counts of the config, as for a preset
    assert main(["info", str(path)]) == 0
    assert label in capsys.readouterr().out


def test_info_of_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    path = write_published(tmp_path / "flash", "flash")
    (path / "model-00002-of-00004.safetensors").unlink()
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model-00002-of-00004.safetensors" in err
