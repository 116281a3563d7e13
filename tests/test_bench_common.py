"""The pieces every benchmark shares: the clock waits for the device it times, on any accelerator."""

import time

import pytest
import torch

from longcat.bench.common import Timer, comparable_config, random_prompts, synchronize


def _record(monkeypatch, target, name):
    calls = []
    monkeypatch.setattr(target, name, lambda device=None: calls.append(device))
    return calls


def test_timer_waits_for_the_current_accelerator_before_every_read(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    calls = _record(monkeypatch, torch.accelerator, "synchronize")
    timer = Timer("wall", "cuda:1")
    t0 = timer()
    elapsed = timer() - t0
    assert calls == [torch.device("cuda:1"), torch.device("cuda:1")]
    assert elapsed >= 0


def test_timer_uses_the_backends_own_module_when_torch_accelerator_does_not_report_it(monkeypatch):
    # e.g. an out-of-tree backend that registers torch.<type> but not torch.accelerator
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    unused = _record(monkeypatch, torch.accelerator, "synchronize")
    calls = _record(monkeypatch, torch.xpu, "synchronize")
    Timer("wall", "xpu")()
    assert calls == [torch.device("xpu")] and unused == []


def test_timer_on_the_cpu_waits_for_nothing(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    calls = _record(monkeypatch, torch.accelerator, "synchronize")
    timer = Timer("cpu", "cpu")
    start = time.process_time()
    assert timer() >= start  # the process's CPU seconds
    synchronize("cpu")
    assert calls == []


def test_timer_refuses_an_unknown_clock():
    with pytest.raises(ValueError, match="clock must be one of wall, cpu"):
        Timer("gpu")


def test_comparable_config_drops_what_transformers_lacks_and_keeps_overrides():
    config = comparable_config("tiny", hidden_size=96)
    assert config.hidden_size == 96
    assert config.oe_vocab_size_ratio == 0.0 and config.index_n_heads == 0 and config.mtp_num_layers == 0


def test_random_prompts_are_reproducible_and_avoid_special_ids():
    a = random_prompts([5, 9], vocab_size=50, seed=3)
    assert a == random_prompts([5, 9], vocab_size=50, seed=3)
    assert [len(p) for p in a] == [5, 9]
    assert all(3 <= t < 50 for p in a for t in p)
