"""The hand-written CPU decode kernel (longcat.infer.kernels, csrc/rows_linear.cpp)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longcat.infer import compiled, kernels

needs_kernel = pytest.mark.skipif(kernels.unsupported_reason() is not None or not kernels.rows_linear_enabled(),
                                  reason=f"the CPU kernel is not available here: {kernels.unsupported_reason() or kernels.disabled_reason()}")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("n_threads", [1, 2])
def test_rows_linear_equals_linear_for_every_row_count_and_ragged_widths(threads, n_threads):
    threads(n_threads)
    g = torch.Generator().manual_seed(0)
    for rows in range(1, kernels.MAX_ROWS + 1):
        for k in (7, 16, 80, 256):  # below, at and between vector widths
            for n in (1, 5, 300, 4097):  # one output, fewer than a task, many parallel tasks
                x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
                torch.testing.assert_close(torch.ops.longcat.rows_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    x = torch.randn(4, 512, generator=g)[:, ::2]  # a strided input is made contiguous first
    w = torch.randn(64, 256, generator=g)
    torch.testing.assert_close(torch.ops.longcat.rows_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("x, w, message", [
    (torch.randn(9, 16), torch.randn(4, 16), "1 to 8 rows, got 9"),
    (torch.randn(2, 16), torch.randn(4, 15), "x has 16 columns, the weight 15"),
    (torch.randn(2, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64), "float32 only"),
    (torch.randn(2, 16), torch.randn(16, 4).t(), "must be contiguous"),
    (torch.randn(2, 2, 16), torch.randn(4, 16), "x \\(rows, in\\)"),
])
def test_rows_linear_names_what_is_wrong_with_its_inputs(x, w, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.longcat.rows_linear(x, w)


@needs_kernel
def test_the_compiled_step_calls_the_kernel_from_kernel_rows_to_eight_rows_only():
    from torch._inductor.utils import run_and_get_code

    w = torch.randn(96, 64)
    for rows, expected in ((1, False), (compiled.KERNEL_ROWS - 1, False), (compiled.KERNEL_ROWS, True), (8, True)):
        x = torch.randn(rows, 1, 64)
        fn = torch.compile(lambda x, w: compiled._linear(x, w), fullgraph=True)
        torch._dynamo.reset()
        out, code = run_and_get_code(fn, x, w)
        torch.testing.assert_close(out, F.linear(x, w), rtol=1e-4, atol=1e-4)
        assert ("rows_linear" in "".join(code)) is expected, rows


def test_a_failed_build_warns_once_and_decoding_keeps_generated_loops(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGCAT_CPU_KERNELS", "1")
    monkeypatch.setenv("LONGCAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "unsupported_reason", lambda: None)
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    monkeypatch.setattr(kernels, "_compiler", lambda: str(tmp_path / "no-such-c++"))
    kernels._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*no C\\+\\+ compiler"):
            assert kernels.rows_linear_enabled() is False
        assert "no C++ compiler" in kernels.disabled_reason()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is quiet
            assert kernels.rows_linear_enabled() is False
        x, w = torch.randn(4, 32), torch.randn(8, 32)
        assert not kernels.rows_linear_applies(x, w, 4)
        torch.testing.assert_close(compiled._linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    finally:
        kernels._reset_for_tests()  # the next caller detects the real state again


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LONGCAT_CPU_KERNELS", "0")
    kernels._reset_for_tests()
    try:
        assert "LONGCAT_CPU_KERNELS=0" in kernels.unsupported_reason()
        assert kernels.rows_linear_enabled() is False
        assert not kernels.rows_linear_applies(torch.randn(2, 16), torch.randn(4, 16), 2)
    finally:
        kernels._reset_for_tests()
