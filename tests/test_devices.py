"""Device names are checked before anything is built, with the setting to change."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from longcat.config import ConfigError
from longcat.devices import DeviceError, auto_device, resolve_device


def test_available_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    assert resolve_device(" Auto ") == auto_device()


def test_malformed_name_names_the_setting():
    with pytest.raises(DeviceError, match=r"train.device='gpu0' is not a device: use auto, cpu, cuda"):
        resolve_device("gpu0", setting="train.device")
    with pytest.raises(ConfigError, match=r"^--device nvidia is not a device"):  # the CLIs print ConfigErrors
        resolve_device("nvidia", setting="--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_missing_backend_is_refused_up_front():
    assert auto_device().type != "cuda"
    with pytest.raises(DeviceError, match=r"--device cuda: there is no cuda device here \(torch .*\); use cpu"):
        resolve_device("cuda", setting="--device")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_npu_without_torch_npu_says_what_is_missing():
    with pytest.raises(DeviceError, match="--device npu:0: Ascend NPUs need the torch_npu package"):
        resolve_device("npu:0", setting="--device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_index_beyond_the_count_is_refused():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}").index == count - 1
    with pytest.raises(DeviceError, match=rf"has {count} cuda device\(s\), numbered 0 to {count - 1}"):
        resolve_device(f"cuda:{count}")
