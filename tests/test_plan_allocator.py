"""The host allocator's retention as a planner mechanism: glibc malloc keeps freed heap chunks between
live ones resident, a measured share of the live tensors (Hardware.allocator_retention), planned as
its own memory category on top of the tensors and calibrated by `longcat plan calibrate`."""

from __future__ import annotations

import pytest

from longcat.config import ConfigError
from longcat.plan.arch import load_architecture
from longcat.plan.calibrate import _pattern_in_child, mapped_heap_bytes, to_toml
from longcat.plan.hardware import load_hardware, load_stack
from longcat.plan.layout import Layout
from longcat.plan.train import ALLOCATED_CATEGORIES, Planner, TrainSetup, allocator_retained

GiB = 2**30


def test_retention_is_a_share_of_the_allocated_tensors_only():
    memory = {"weights": 1.0, "gradients": 2.0, "optimizer": 4.0, "ema": 8.0, "activations": 16.0,
              "pipeline_inflight": 32.0, "logits": 64.0, "comm_buffers": 128.0,
              "reserved": 1000.0, "library": 3000.0}  # resident already: measured as RSS, not allocated tensors
    assert allocator_retained(memory, 0.25) == pytest.approx(0.25 * 255.0)
    assert allocator_retained(memory, 0.0) == 0.0
    assert allocator_retained({"activations": 10.0}, 0.5) == pytest.approx(5.0)  # missing categories count 0
    assert set(ALLOCATED_CATEGORIES).isdisjoint({"reserved", "library", "allocator"})


def _small_plan(retention: float):
    hw = load_hardware("cpu-local", {"allocator_retention": retention})
    planner = Planner(TrainSetup(load_architecture("small"), hw, load_stack("pytorch-eager"), 1, 256, 256 * 16,
                                 precision="autocast"))
    return planner.evaluate(Layout(microbatch=16, zero=0, dp=1))


def test_planner_adds_the_retention_on_top_of_the_live_tensors():
    without, held = _small_plan(0.0), _small_plan(0.4)
    assert without.memory["allocator"] == 0.0
    tensors = sum(held.memory[k] for k in ALLOCATED_CATEGORIES)
    assert tensors > 0.5 * GiB  # the small model's weights, AdamW state and activations
    assert held.memory["allocator"] == pytest.approx(0.4 * tensors)
    # everything else is the same plan: the retention only adds its own category
    for key, value in without.memory.items():
        if key != "allocator":
            assert held.memory[key] == pytest.approx(value)
    assert held.memory_gib["total"] == pytest.approx(without.memory_gib["total"] + 0.4 * tensors / GiB)


def test_gpu_entries_have_no_host_allocator_retention():
    assert load_hardware("h100").allocator_retention == 0.0


def test_negative_retention_is_rejected_with_the_field_named():
    with pytest.raises(ConfigError, match="allocator_retention must be >= 0"):
        load_hardware("cpu-local", {"allocator_retention": -0.1})


def _measured(**changes) -> dict:
    measured = {
        "threads": 1, "model": "small", "tokens": 4096, "clock": "process CPU time",
        "peak_tflops_fp32": 0.09, "peak_tflops_bf16": 0.2, "gemm_efficiency": 0.8, "expert_gemm_efficiency": 0.4,
        "attention_efficiency": 0.1, "hbm_bandwidth_gbs": 20.0, "memory_efficiency": 0.3, "cache_elementwise_gbs": 25.0,
        "kernel_overhead_us": 4.0, "hbm_gib": 24.0, "reserved_gib": 0.29, "library_cache_gib": 0.6,
        "library_cache_per_shape_mib": 1.9, "allocator_retention": 0.437,
        "gemm_shapes": [(4096, 256, 512)], "attention_shape": (16, 4, 256, 48, 32),
    }
    measured.update(changes)
    return measured


def test_calibrated_toml_round_trips_the_retention(tmp_path):
    path = tmp_path / "cpu-local.toml"
    path.write_text(to_toml(_measured()))
    hw = load_hardware(str(path))
    assert hw.allocator_retention == pytest.approx(0.437)
    assert hw.provenance["allocator_retention"] == "measured"
    assert "MALLOC_MMAP_THRESHOLD_" in hw.notes["allocator_retention"]  # the note says how it was measured
    # an entry calibrated before the field existed plans no retention
    path.write_text(to_toml({k: v for k, v in _measured().items() if k != "allocator_retention"}))
    assert load_hardware(str(path)).allocator_retention == 0.0


def test_pattern_child_runs_the_step_and_reports_its_peak():
    """The micro-benchmark's child process: a fresh interpreter whose peak RSS is above its baseline
    by at least the fp32 weights, their gradients and AdamW's two moments (16 bytes per parameter);
    with every buffer mapped alone (the live run), those matrices are mapped blocks that
    mallinfo2 counts, so the live tensors are read without the libraries' memory."""
    spec = {"tokens": 128, "threads": 1, "hidden": 128, "ffn": 512, "layers": 2, "experts": 4, "inner": 32, "slots": 2.0}
    matrices = spec["layers"] * (3 * spec["ffn"] * spec["hidden"] + spec["experts"] * 3 * spec["inner"] * spec["hidden"])
    params = matrices + spec["layers"] * spec["hidden"]
    results = {live: _pattern_in_child(spec, live=live) for live in (False, True)}
    for result in results.values():
        assert result["peak"] - result["baseline"] >= 16 * params
    if mapped_heap_bytes() or results[True]["mapped"]:  # glibc >= 2.33 reports mapped blocks
        assert results[True]["mapped"] >= 16 * matrices
        assert results[True]["mapped"] <= results[True]["peak"] - results[True]["baseline"] + 2**20
