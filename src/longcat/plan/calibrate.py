"""`longcat plan calibrate`: measure this machine into a hardware entry (default `cpu-local`).

What is measured, and how it maps to the planner's fields:
- peak_tflops_bf16 / fp32: the best rate of a large square matmul (the machine's practical peak);
- gemm_efficiency: the rate of transformer-shaped GEMMs (with --model: that model's own shapes),
  forward and both backward GEMMs through autograd, over that peak;
- expert_gemm_efficiency: the same for the routed experts' grouped GEMMs (`torch._grouped_mm`);
- attention_efficiency: causal `scaled_dot_product_attention` forward+backward, counted as
  2 + 4 matmuls of causal FLOPs, over the bf16 peak;
- masked_attention_efficiency: the same given a (T, T) boolean keep-mask, FLOPs of every key (LSA
  training on a runtime without a sparse kernel);
- hbm_bandwidth_gbs: an element-wise kernel on a buffer far larger than the caches (read + write);
- memory_efficiency: bytes over time for the element-wise kernels a step runs (casts, products,
  SiLU, log-softmax over the vocabulary, MoE gather and scatter-add), each timed with its operands
  out of the caches, over that bandwidth;
- cache_elementwise_gbs: bytes over time of the fused cross-entropy's element-wise chain on one
  block of logits (8 MiB of fp32), which stays in cache (the planner's rate for those blocks);
- kernel_overhead_us: the time of a tiny eager op with autograd (dispatch, not work);
- hbm_gib: physical memory; reserved_gib: this process's resident memory once torch and the model
  are loaded and deterministic algorithms are on, as the Trainer sets itself up (the runtime's own
  share, which a training process pays before any tensor);
- allocator_retention: the share of the live tensors that the host allocator (glibc malloc) keeps
  resident on top of them at a training step's peak: freed heap chunks between live ones, which
  its heap keeps (mallopt(3)); measured on a generic training step, default malloc against every
  buffer mapped alone (see `allocator_retention`);
- library_cache_gib, library_cache_per_shape_mib: the GEMM library's kernel cache. oneDNN (behind
  PyTorch's CPU matmuls) keeps a compiled primitive with its scratch memory for every GEMM shape it
  has run, up to a fixed capacity. Measured by running linear layers (forward and backward) of
  ever new row counts, as uneven expert loads produce, and reading the resident memory (after
  returning freed heap to the OS) until it stops growing: the growth per shape, and the plateau.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

GiB = 2**30


# Wall-clock by default. On a machine shared with other jobs, `measure(cpu_time=True)` with one
# thread times the process's own CPU seconds instead, which other processes do not inflate.
_clock = time.perf_counter


def _best_time(fn, repeats: int, before=None) -> float:
    """Best of `repeats` timed calls of fn after a warm-up; `before()`, untimed, runs ahead of each
    (e.g. evicting fn's operands from the caches, for the rate of a kernel reading memory)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        t = _clock()
        fn()
        best = min(best, _clock() - t)
    return best


def last_level_cache_bytes(default: int = 64 * 2**20) -> int:
    """The largest CPU cache this process's first core sees (Linux sysfs), else `default`."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else default


def peak_rss_bytes() -> int:
    """Peak resident memory of this process alone (`longcat.telemetry.peak_rss`: VmHWM on Linux)."""
    from ..telemetry import peak_rss

    return peak_rss()[0]


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def resident_bytes() -> int:
    """Resident memory after returning freed heap pages to the OS (glibc malloc_trim): live memory
    plus what libraries hold, without the allocator's retention."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return current_rss_bytes()


def library_cache(torch, shapes: int = 400, every: int = 20) -> tuple[float, float]:
    """(plateau GiB, MiB per linear-layer shape) of the GEMM library's per-shape cache: `shapes`
    linear layers of new row counts, forward and backward, in bf16 (see the module docstring)."""
    H, F = 256, 32
    w1 = torch.randn(2 * F, H, dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(H, F, dtype=torch.bfloat16, requires_grad=True)
    start = resident_bytes()
    growth = []
    for rows in range(1, shapes + 1):
        x = torch.randn(rows, H, dtype=torch.bfloat16, requires_grad=True)
        h = torch.nn.functional.linear(x, w1)[:, :F]
        torch.nn.functional.linear(h, w2).sum().backward()
        if rows % every == 0:
            growth.append(max(0, resident_bytes() - start))
    w1 = w2 = x = h = None
    per_shape = growth[0] / (2 * every) if growth else 0.0  # two linear layers per row count
    return max(growth, default=0) / GiB, per_shape / 2**20


# --- the host allocator's retention ------------------------------------------------------------------
# glibc malloc (mallopt(3)): a request under M_MMAP_THRESHOLD is carved from the heap; above it, it
# is mmapped and unmapped on free. The threshold is dynamic: freeing an mmapped block raises it to
# that block's size (up to 32 MiB on 64-bit), and M_TRIM_THRESHOLD to twice that, so after a few
# frees nearly every tensor of a training step lives in the heap. Freed heap chunks are reused only
# by requests that fit them; the holes between live chunks stay resident (only the top of the heap
# is trimmed). A training step interleaves lifetimes (saved activations between the forward's
# transients, weight gradients between the backward's), so the heap holds holes at the peak. The
# share is a property of the allocator under that pattern, measured here on a generic step.
ALLOCATOR_STEPS = 12  # as `longcat bench plan` measures: 2 warm-up + 10 steps
LIVE_MMAP_THRESHOLD = 65536  # MALLOC_MMAP_THRESHOLD_: every tensor buffer mapped alone, no retention


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mapped_heap_bytes() -> int:
    """Bytes glibc malloc holds in mmapped blocks now (mallinfo2's hblkhd); 0 where unknown. With
    MALLOC_MMAP_THRESHOLD_ low, every tensor buffer above it is such a block: the live tensors,
    without the libraries' own resident memory."""
    try:
        info = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return 0
    info.restype = _MallInfo2
    return int(info().hblkhd)


def allocator_pattern_step(spec: dict[str, int | float]) -> dict[str, float]:
    """Peak and baseline resident bytes of `spec["steps"]` generic training steps in this process,
    and the most bytes malloc held in mapped blocks after a forward or a backward.

    The step is not the model's: `layers` pre-norm blocks of a SwiGLU MLP (hidden, ffn) and routed
    experts (grouped GEMMs of `experts` experts, `inner` wide, on rows gathered for `slots` slots
    per token, split unevenly as a router splits them and padded to bucketed counts as CPU
    training pads them, so their sizes change from step to step), bf16 autocast over fp32 weights, AdamW
    (single-tensor), gradients set to None between steps; at `tokens` tokens per step."""
    import torch

    from ..model.moe import bucketed_count

    torch.set_num_threads(int(spec.get("threads", 1)))
    baseline = current_rss_bytes()
    t, H, F = int(spec["tokens"]), int(spec["hidden"]), int(spec["ffn"])
    E, inner, slots, L = int(spec["experts"]), int(spec["inner"]), float(spec["slots"]), int(spec["layers"])
    gen = torch.Generator().manual_seed(0)

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.02)

    blocks = [{"norm": param(H), "up": param(2 * F, H), "down": param(H, F),
               **({"w1": param(E, 2 * inner, H), "w2": param(E, H, inner)} if E else {})} for _ in range(L)]
    params = [p for b in blocks for p in b.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    rows = int(t * slots) if hasattr(torch, "_grouped_mm") else 0  # without grouped GEMMs: the dense blocks only
    mapped = 0
    for _ in range(int(spec.get("steps", ALLOCATOR_STEPS))):
        x = torch.randn(t, H, generator=gen, requires_grad=True)  # (t, H)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = x
            for b in blocks:
                n = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6) * b["norm"]
                gate, up = torch.nn.functional.linear(n, b["up"]).chunk(2, dim=-1)  # (t, F) each
                h = h + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, b["down"])
                if E and rows:
                    # a router's uneven loads, each padded to a bucketed count as CPU training pads
                    # them: the experts' buffers change size from step to step
                    counts = torch.bincount(torch.randint(0, E, (rows,), generator=gen), minlength=E)
                    padded = torch.tensor([bucketed_count(c) for c in counts.tolist()])
                    index = torch.randint(0, t, (int(padded.sum()),), generator=gen)  # (rows',) token of each row
                    offsets = padded.cumsum(0).to(torch.int32)
                    xs = n[index].to(torch.bfloat16)  # (rows', H)
                    g = torch._grouped_mm(xs, b["w1"].to(torch.bfloat16).transpose(-2, -1), offs=offsets)
                    g = torch.nn.functional.silu(g[:, :inner]) * g[:, inner:]  # (rows', inner)
                    y = torch._grouped_mm(g, b["w2"].to(torch.bfloat16).transpose(-2, -1), offs=offsets)
                    h = h.index_add(0, index, y.to(h.dtype))
        mapped = max(mapped, mapped_heap_bytes())  # the end of the forward: most activations live
        h.float().pow(2).mean().backward()
        mapped = max(mapped, mapped_heap_bytes())  # weight gradients live
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del x, h
    return {"peak": peak_rss_bytes(), "baseline": baseline, "mapped": mapped}


def _pattern_in_child(spec: dict, live: bool) -> dict[str, float]:
    import json
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(LIVE_MMAP_THRESHOLD)} if live else \
        {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-m", "longcat.plan.calibrate", json.dumps(spec)], capture_output=True,
                          text=True, check=False, env=env)
    if proc.returncode:
        raise RuntimeError(f"the allocator measurement's child process failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def allocator_retention(arch=None, tokens: int = 4096, threads: int = 1, steps: int = ALLOCATOR_STEPS) -> float:
    """Resident memory the heap keeps beyond the live tensors at the peak, as a share of the live
    tensors: the generic step of `allocator_pattern_step` at `arch`'s sizes (without one: 4 blocks
    256 wide with 64 experts), once with the default allocator and once with every buffer mapped
    alone (its peak RSS is the live peak), each in a fresh process."""
    spec = {"tokens": tokens, "threads": threads, "steps": steps, "hidden": 256, "ffn": 1024, "layers": 4, "experts": 64, "inner": 64,
            "slots": 4.0}
    if arch is not None:
        spec.update(hidden=arch.hidden_size, ffn=arch.ffn_hidden_size or 4 * arch.hidden_size, layers=arch.num_layers,
                    experts=arch.n_routed_experts if arch.is_moe else 0,
                    inner=arch.expert_ffn_hidden_size if arch.is_moe else 0,
                    slots=float(arch.slots) if arch.is_moe else 0.0)
    default, live = _pattern_in_child(spec, live=False), _pattern_in_child(spec, live=True)
    # the live tensors: mapped blocks when every buffer is mapped (the GEMM library's kernel cache,
    # which grows with the step's changing expert sizes, is not a tensor); else the RSS growth
    live_tensors = live.get("mapped") or live["peak"] - live["baseline"]
    return max(0.0, (default["peak"] - live["peak"]) / live_tensors) if live_tensors > 0 else 0.0


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _gemm_shapes(arch, tokens: int) -> tuple[list[tuple[int, int, int]], tuple[int, int, int, int] | None]:
    """Forward GEMM shapes (M, K, N) of one block and the head, and the routed-expert shape
    (rows, experts, hidden, expert inner) of an architecture, at `tokens` tokens."""
    H, a = arch.hidden_size, arch.num_heads
    shapes = []
    if arch.attention == "mla":
        if arch.q_lora_rank:
            shapes += [(tokens, H, arch.q_lora_rank), (tokens, arch.q_lora_rank, a * arch.qk_dim)]
        else:
            shapes.append((tokens, H, a * arch.qk_dim))
        shapes += [(tokens, H, arch.kv_lora_rank + arch.qk_rope_head_dim),
                   (tokens, arch.kv_lora_rank, a * (arch.qk_nope_head_dim + arch.v_head_dim))]
    else:
        shapes += [(tokens, H, (a + 2 * arch.kv_heads) * arch.qk_dim)]
    shapes.append((tokens, a * arch.v_dim, H))
    inner = arch.ffn_hidden_size
    shapes += [(tokens, H, (2 if arch.mlp == "swiglu" else 1) * inner), (tokens, inner, H), (tokens, H, arch.vocab_size)]
    expert = None
    if arch.is_moe:
        rows = int(tokens * arch.slots)
        expert = (rows, arch.n_routed_experts, H, arch.expert_ffn_hidden_size)
    return shapes, expert


def _elementwise_mix(torch, arch, tokens: int):
    """(name, bytes moved, callable) for the element-wise kernels of an eager training step: dtype
    casts, products, activations, the log-softmax over the vocabulary, and the MoE gather and
    scatter-add. Sizes follow `arch` (or a generic 256-wide model) at `tokens` tokens."""
    H = getattr(arch, "hidden_size", 256)
    F_ = getattr(arch, "ffn_hidden_size", 4 * H)
    V = getattr(arch, "vocab_size", 8192)
    slots = max(1, int(getattr(arch, "slots", 0) or 0))
    h32 = torch.randn(tokens, H)
    f16 = torch.randn(tokens, F_, dtype=torch.bfloat16)
    logits = torch.randn(max(1, tokens // 4), V)
    index = torch.randint(0, tokens, (tokens * slots,))
    rows = torch.randn(tokens * slots, H)
    acc = torch.zeros(tokens, H)
    n_h, n_f, n_v, n_r = h32.numel(), f16.numel(), logits.numel(), rows.numel()
    return [
        ("cast bf16->fp32", 6 * n_f, lambda: f16.float()),
        ("fp32 product", 12 * n_h, lambda: h32 * h32),
        ("silu bf16", 4 * n_f, lambda: torch.nn.functional.silu(f16)),
        ("log-softmax fp32", 8 * n_v, lambda: torch.log_softmax(logits, dim=-1)),
        ("gather rows", 8 * n_r, lambda: h32[index[: tokens * slots]]),
        ("scatter-add rows", 12 * n_r, lambda: acc.index_add(0, index, rows)),
    ]


def _loss_block_rate(torch, vocab: int, reps: int) -> float:
    """GB/s of the fused cross-entropy's element-wise chain over one block that stays in cache
    (longcat.model.cross_entropy, per logit: cast to fp32, log-sum-exp, subtract and exponentiate
    in place, scale, cast to bf16: the planner's FUSED_LOSS_BYTES_PER_LOGIT). Logits of a trained
    head's scale: far-negative ones would make exp produce subnormals, a slow path no step takes."""
    from ..model.cross_entropy import block_rows_for
    from .train import FUSED_LOSS_BYTES_PER_LOGIT

    rows = block_rows_for(vocab)
    product = (0.5 * torch.randn(rows, vocab)).to(torch.bfloat16)  # (rows, V): one block
    scale = torch.full((rows, 1), 1.0 / rows)

    def chain():
        logits = product.float()
        lse = torch.logsumexp(logits, dim=-1)
        grad = logits.sub_(lse.unsqueeze(1)).exp_()
        return grad.mul_(scale).to(torch.bfloat16)

    for _ in range(3):  # as in a step, where block follows block: the allocator reuses the buffers
        chain()
    return FUSED_LOSS_BYTES_PER_LOGIT * rows * vocab / _best_time(chain, max(reps, 10)) / 1e9


def training_runtime_rss(torch) -> int:
    """Resident bytes of a process set up as `longcat train` sets itself up, before any tensor:
    torch and the model package loaded, deterministic algorithms on (the Trainer's default
    `train.deterministic`; turning them on maps tens of MiB once). The process's previous
    deterministic settings are restored; the memory stays mapped either way."""
    from .. import model  # noqa: F401  (the training process's own modules)

    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return current_rss_bytes()
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def measure(quick: bool = False, threads: int | None = None, arch=None, tokens: int = 4096, seq_len: int = 512,
            cpu_time: bool = False) -> dict[str, Any]:
    """Measure this machine. With `arch`, the GEMM and attention efficiencies are measured on that
    model's own shapes at `tokens` tokens per step (and `seq_len` for attention). `cpu_time` times
    process CPU seconds (meaningful with threads=1) instead of wall-clock seconds."""
    global _clock
    import torch

    if threads:
        torch.set_num_threads(threads)
    if cpu_time and torch.get_num_threads() != 1:
        raise ValueError("cpu_time=True needs threads=1: with more threads CPU seconds add up across threads")
    _clock = time.process_time if cpu_time else time.perf_counter
    baseline_rss = training_runtime_rss(torch)
    # first, while no other GEMM has filled it: the library's per-shape cache
    out_cache = library_cache(torch, shapes=60 if quick else 400)
    # the peak needs a GEMM large enough to reach it (a 256^3 one reaches a fraction of it, and a
    # different fraction every run); 1024^3 still takes milliseconds
    n = 1024 if quick else 2048
    reps = 3 if quick else 5
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "model": getattr(arch, "name", None), "tokens": tokens,
                           "quick": quick}

    def matmul_time(m: int, k: int, nn: int, dtype) -> float:
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, nn, dtype=dtype)
        return _best_time(lambda: torch.mm(a, b), reps)

    def train_matmul_time(m: int, k: int, nn: int) -> float:
        """Forward and both backward GEMMs of a linear layer through autograd (6*m*k*n FLOPs)."""
        x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(nn, k, dtype=torch.bfloat16, requires_grad=True)  # nn.Linear layout (out, in)
        grad = torch.randn(m, nn, dtype=torch.bfloat16)

        def run():
            x.grad = w.grad = None
            torch.nn.functional.linear(x, w).backward(grad)

        return _best_time(run, reps)

    out["peak_tflops_fp32"] = 2 * n**3 / matmul_time(n, n, n, torch.float32) / 1e12
    out["peak_tflops_bf16"] = 2 * n**3 / matmul_time(n, n, n, torch.bfloat16) / 1e12
    peak = out["peak_tflops_bf16"] * 1e12
    if quick:
        tokens = min(tokens, 256)
    out["tokens"] = tokens
    if arch is not None:
        shapes, expert = _gemm_shapes(arch, tokens)
    else:
        shapes, expert = [(tokens, 256, 1024), (tokens, 1024, 256), (tokens, 512, 512)], None
    # training runs each GEMM forward and twice backward (input and weight gradients): time all three
    flops = sum(6 * m * k * nn for m, k, nn in shapes)
    seconds = sum(train_matmul_time(m, k, nn) for m, k, nn in shapes)
    out["gemm_efficiency"] = min(1.0, flops / seconds / peak)
    out["gemm_shapes"] = shapes
    if expert is not None and hasattr(torch, "_grouped_mm"):
        rows, experts, hidden, inner = expert
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, requires_grad=True)
        # stored as the model stores them, (E, 2F, H) and (E, H, F), and used transposed
        w1 = torch.randn(experts, 2 * inner, hidden, dtype=torch.bfloat16, requires_grad=True)
        w2 = torch.randn(experts, hidden, inner, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(rows, hidden, dtype=torch.bfloat16)
        # uneven loads, as a router produces: counts drawn from a multinomial over the experts
        gen = torch.Generator().manual_seed(0)
        counts = torch.bincount(torch.randint(0, experts, (rows,), generator=gen), minlength=experts)
        offsets = counts.cumsum(0).to(torch.int32)

        def experts_step():
            x.grad = w1.grad = w2.grad = None
            h = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)[:, :inner].contiguous()
            torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets).backward(grad)

        t = _best_time(experts_step, reps)
        # forward: gate_up (2*rows*hidden*2F) + down (2*rows*F*hidden); backward twice that
        out["expert_gemm_efficiency"] = min(1.0, 3 * 2 * rows * hidden * 3 * inner / t / peak)
        out["expert_shape"] = expert

    # attention: causal SDPA forward + backward in bf16, at the model's head sizes when given
    if arch is not None:
        h_, d_qk, d_v = arch.num_heads, arch.qk_dim, arch.v_dim
        T = min(seq_len, 64 if quick else seq_len)
        B = max(1, tokens // T)
    else:
        (B, h_, T, d_qk), d_v = ((2, 4, 64, 64) if quick else (8, 8, 512, 64)), 64
    q, k = (torch.randn(B, h_, T, d_qk, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, h_, T, max(d_v, d_qk), dtype=torch.bfloat16, requires_grad=True)  # padded as the model does

    def attention():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.sum().backward()

    flops = 3 * 2 * B * h_ * T * (T + 1) / 2 * (d_qk + d_v)  # causal QK^T + AV, x3 for forward + backward
    out["attention_efficiency"] = min(1.0, flops / _best_time(attention, reps) / peak)
    out["attention_shape"] = (B, h_, T, d_qk, d_v)
    # the same with an explicit keep-mask, as LSA training runs it without a sparse kernel: causal
    # keys, a random half of them dropped; every key is computed, so every key is counted
    gen = torch.Generator().manual_seed(0)
    keep = (torch.rand(B, 1, T, T, generator=gen) < 0.5) | torch.eye(T, dtype=torch.bool)
    keep &= torch.ones(T, T, dtype=torch.bool).tril()

    def masked_attention():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        o.sum().backward()

    masked_flops = 3 * 2 * B * h_ * T * T * (d_qk + d_v)
    out["masked_attention_efficiency"] = min(1.0, masked_flops / _best_time(masked_attention, reps) / peak)

    # memory bandwidth: an element-wise kernel on buffers much larger than the caches
    size = (8 if quick else 256) * 2**20 // 4
    src = torch.ones(size)
    dst = torch.empty(size)
    t = _best_time(lambda: torch.mul(src, 1.0001, out=dst), reps)
    out["hbm_bandwidth_gbs"] = 2 * size * 4 / t / 1e9
    src = dst = None  # free the 256 MiB buffers
    # memory_efficiency: the element-wise kernels a training step runs, at their own rates, each
    # with its operands out of the caches: in a step they were written many ops earlier (the
    # backward reads what the forward saved), and the planner counts their bytes as memory traffic.
    # Timed hot, a step's small tensors would run at cache rates no step sees.
    flush = torch.empty(min(2 * last_level_cache_bytes(), 1 << 30) // 4)
    bytes_moved, seconds = 0.0, 0.0
    for name, nbytes, fn in _elementwise_mix(torch, arch, tokens):
        t = _best_time(fn, reps, before=lambda: flush.fill_(1.0))
        bytes_moved += nbytes
        seconds += t
    out["memory_efficiency"] = min(1.0, bytes_moved / seconds / (out["hbm_bandwidth_gbs"] * 1e9))
    flush = None
    out["cache_elementwise_gbs"] = _loss_block_rate(torch, getattr(arch, "vocab_size", 8192), reps)

    # per-op dispatch cost of eager PyTorch with autograd
    small = torch.ones(8, requires_grad=True)
    count = 100 if quick else 2000

    def tiny_ops():
        z = small
        for _ in range(count):
            z = z * 1.0
        return z

    out["kernel_overhead_us"] = _best_time(tiny_ops, 3) / count * 1e6
    out["hbm_gib"] = physical_memory_bytes() / GiB
    out["reserved_gib"] = baseline_rss / GiB
    out["library_cache_gib"], out["library_cache_per_shape_mib"] = out_cache
    out["allocator_retention"] = allocator_retention(arch, tokens, torch.get_num_threads(), steps=4 if quick else ALLOCATOR_STEPS)
    out["clock"] = "process CPU time" if cpu_time else "wall clock"
    _clock = time.perf_counter
    return out


def to_toml(measured: dict[str, Any], name: str = "cpu-local") -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    lines = [
        f'name = "{name}"',
        f'description = "this machine, measured by `longcat plan calibrate` ({cpu}, {os.cpu_count()} cores, {measured["threads"]} '
        f'thread{"s" if measured["threads"] != 1 else ""}, {measured.get("clock", "wall clock")})"',
        "",
        "[measured]",
    ]
    order = ["peak_tflops_bf16", "peak_tflops_fp32", "gemm_efficiency", "expert_gemm_efficiency", "attention_efficiency",
             "masked_attention_efficiency", "hbm_bandwidth_gbs",
             "memory_efficiency", "cache_elementwise_gbs", "kernel_overhead_us", "hbm_gib", "reserved_gib", "library_cache_gib",
             "library_cache_per_shape_mib", "allocator_retention"]
    for key in order:
        if key in measured:
            lines.append(f"{key} = {measured[key]:.6g}")
    lines += [
        "",
        "[estimated]",
        "peak_tflops_fp8 = 0",
        "scaleup_domain = 1",
        f"scaleup_bandwidth_gbs = {measured['hbm_bandwidth_gbs']:.6g}   # processes on one host talk through memory",
        "scaleout_bandwidth_gbs = 1.0",
        "scaleup_efficiency = 0.5",
        "scaleout_efficiency = 0.8",
        "collective_latency_us = 50",
        "chip_mtbf_hours = 50000",
        "restart_minutes = 1",
        "storage_write_gbs_per_chip = 1.0",
        "storage_write_gbs_max = 1.0",
        "",
        "[notes]",
        'peak_tflops_bf16 = "best square bf16 matmul"',
        'peak_tflops_fp32 = "best square fp32 matmul"',
        f'gemm_efficiency = "bf16 matmuls forward + backward, shapes (M, K, N) {measured["gemm_shapes"]}'
        + (f' ({measured["model"]} at {measured["tokens"]} tokens)' if measured.get("model") else " (generic)") + '"',
        f'attention_efficiency = "causal SDPA forward+backward, bf16, (B, heads, T, d_qk, d_v) = {measured["attention_shape"]}"',
        'masked_attention_efficiency = "the same SDPA given a random causal (T, T) keep-mask (LSA training without a sparse '
        'kernel), FLOPs of every key"',
        'reserved_gib = "resident memory of a process set up as longcat train (torch and the model loaded, deterministic algorithms on), before any model tensor"',
        'library_cache_gib = "plateau of the resident memory the GEMM library (oneDNN) keeps per GEMM shape it has run: bf16 linear layers forward + backward at new row counts until the growth stops"',
        'library_cache_per_shape_mib = "the same growth per linear-layer shape (forward + backward), before the plateau"',
        'allocator_retention = "resident heap beyond the live tensors at the peak, over the live tensors: peak RSS of '
        f'{4 if measured.get("quick") else ALLOCATOR_STEPS} generic training steps (pre-norm SwiGLU blocks, uneven grouped-GEMM experts on bucketed row counts, '
        'bf16 autocast, AdamW) with the default glibc malloc minus the same with MALLOC_MMAP_THRESHOLD_=65536 (every buffer '
        'mapped alone: the live peak), over the live run\'s most mapped bytes (mallinfo2), each in a fresh process; '
        'glibc mallopt(3)"',
        'hbm_bandwidth_gbs = "fp32 multiply on 256 MiB buffers (read + write)"',
        'memory_efficiency = "bytes / time over a mix of eager element-wise kernels (casts, products, SiLU, log-softmax, MoE gather and scatter-add), over hbm_bandwidth_gbs"',
        'cache_elementwise_gbs = "bytes / time of the fused cross-entropy\'s element-wise chain (cast, log-sum-exp, exp, scale, cast) over one 8 MiB block of fp32 logits, which stays in cache"',
    ]
    if "expert_shape" in measured:
        lines.append(f'expert_gemm_efficiency = "torch._grouped_mm gate_up + down, forward + backward, (rows, experts, hidden, inner) = {measured["expert_shape"]}"')
    lines += [
        "",
    ]
    return "\n".join(lines)


def default_output(name: str = "cpu-local") -> Path:
    """The user's hardware folder: it overrides the packaged entry of the same name."""
    from ..catalog import user_dir

    return user_dir("hardware") / f"{name}.toml"


__all__ = ["measure", "to_toml", "default_output", "peak_rss_bytes", "current_rss_bytes", "resident_bytes", "library_cache",
           "training_runtime_rss", "allocator_retention", "allocator_pattern_step", "mapped_heap_bytes"]


if __name__ == "__main__":  # the child process of _pattern_in_child
    import json as _json
    import sys as _sys

    print(_json.dumps(allocator_pattern_step(_json.loads(_sys.argv[1]))))
