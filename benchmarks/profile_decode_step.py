"""Where a compiled decode step spends its time (issue #4's batch-8 analysis, docs/INFERENCE.md).

    .venv/bin/python benchmarks/profile_decode_step.py --batch 8                # step time
    .venv/bin/python benchmarks/profile_decode_step.py --batch 8 --pin-experts  # + routing pinned
    .venv/bin/python benchmarks/profile_decode_step.py --batch 8 --attribute    # + samples by part

Times the bare compiled decode graph (`decode_graph`, no engine around it) of the `small` preset
that `longcat bench infer` measures, over a cache of `--cached` tokens.

--pin-experts adds, in the same run, a copy of the model whose router bias sends every token to
the same 8 FFN experts (and 4 zero-computation ones) in every layer: the step then reads as many
expert weights at batch 8 as at batch 1, which separates the cost of the extra expert bytes from
the cost of the extra rows.

--attribute samples the step with `perf record` (needs `perf` and `addr2line`) and attributes
each sample in the generated code to its loop nest, and each loop nest to the weights it reads
(their offsets in the flat weight buffer are literals in the generated code); samples outside the
generated code are grouped by library. The graph is compiled with debug line info
(TORCHINDUCTOR_DEBUG_SYMBOL) into its own inductor cache directory, so the first run compiles.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from longcat.config import ConfigError, parse_overrides, preset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="rows per step (a compiled row bucket: 1, 2, 4, 8, ...)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--cached", type=int, default=64, help="tokens already in the cache (default 64)")
    p.add_argument("--rounds", type=int, default=9, help="timing rounds of 100 steps; the median is printed")
    p.add_argument("--pin-experts", action="store_true", help="also time the step with routing pinned to 8 experts")
    p.add_argument("--attribute", action="store_true", help="perf samples by loop nest and weight (needs perf)")
    p.add_argument("--seconds", type=float, default=5.0, help="perf sampling time per graph (default 5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the `small` preset (e.g. hidden_size=512), as `longcat bench infer`")
    args = p.parse_args(argv)
    for name in ("batch", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.cached < 1 or args.seconds <= 0:
        p.error("--cached must be at least 1 and --seconds positive")
    try:
        args.overrides = parse_overrides(args.overrides)
        preset("small", **args.overrides)  # checked here: names and values
    except ConfigError as error:
        p.error(str(error))
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.attribute:
    missing = [tool for tool in ("perf", "addr2line") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"--attribute needs {' and '.join(missing)} on PATH (Debian: apt install linux-perf binutils)")
    # set before torch is imported: line info in the generated code, in a cache of its own (a
    # cached build without it would be loaded otherwise)
    os.environ["TORCHINDUCTOR_DEBUG_SYMBOL"] = "1"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "longcat-inductor-debug"))

import torch  # noqa: E402

from longcat.infer import compiled as C  # noqa: E402
from longcat.infer.benchmark import comparable_config  # noqa: E402
from longcat.model import LatentCache, build_model  # noqa: E402

def build_step(batch: int, cached: int, pinned: bool, overrides: dict | None = None):
    """(compiled graph, its arguments, packed weights) for one decode step of `batch` rows."""
    config = comparable_config("small", **(overrides or {}))
    model = build_model(config, seed=0).eval()
    if pinned:
        with torch.no_grad():
            for layer in model.layers:
                bias = layer.mlp.router.e_score_correction_bias
                experts = layer.mlp.num_experts
                bias[:8] += 10.0  # FFN experts 0-7
                bias[experts : experts + 4] += 10.0  # and 4 zero-computation ones: 8 of 12 slots, as on average
    decoder = C.CompiledDecoder(model)  # its decode graph, called directly below (no engine around it)
    cache = LatentCache(config, batch, cached + 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, 1), generator=g)
    with torch.inference_mode():
        h = model.embed(ids, None)
    args = (*decoder.graph_inputs(h, torch.full((batch, 1), cached), cache, cached, batch), True)
    return decoder._graph, args, decoder.packed


def time_step(graph, args, rounds: int) -> float:
    """Median ms per step over `rounds` x 100 steps (after 50 warm-up steps)."""
    times = []
    with torch.inference_mode():
        for _ in range(50):
            graph(*args)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(100):
                graph(*args)
            times.append((time.perf_counter() - t0) / 100 * 1e3)
    return sorted(times)[len(times) // 2]


# --- attribution --------------------------------------------------------------------------------

def _load_bias(library: str) -> int:
    """Runtime address of the library's file offset 0 (its first mapping)."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1] == library and int(fields[2], 16) == 0:
            return int(fields[0].split("-")[0], 16)
    raise SystemExit(f"{library} is not mapped")


def _sample(graph, args, seconds: float) -> list[tuple[int, str]]:
    """(instruction address, library) of every perf sample taken while the step runs in a loop."""
    out = tempfile.NamedTemporaryFile(suffix=".perf.data", delete=False).name
    proc = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-p", str(os.getpid()), "-o", out, "--",
                             "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with torch.inference_mode():
        while proc.poll() is None:
            graph(*args)
    if proc.returncode != 0:
        raise SystemExit(f"perf record failed: {proc.stderr.read().decode().strip()[-400:]}\n"
                         "(perf_event_paranoid may forbid it: sysctl kernel.perf_event_paranoid=1)")
    script = subprocess.run(["perf", "script", "-i", out, "-G", "-F", "ip,dso"], capture_output=True, text=True)
    os.unlink(out)
    samples = []
    for line in script.stdout.splitlines():
        m = re.match(r"\s*([0-9a-f]+)\s+\((.*)\)", line)
        if m:
            samples.append((int(m.group(1), 16), m.group(2)))
    return samples


def _loop_nests(source: list[str]) -> dict[int, tuple[int, int]]:
    """line -> (first, last) line of the outermost loop nest enclosing it."""
    nest_of: dict[int, tuple[int, int]] = {}
    stack: list[tuple[int, bool]] = []  # (line of "{", opens a loop body)
    open_nest: list[int] = []
    for i, line in enumerate(source, 1):
        text = line.strip()
        if text == "{":
            prev = next((source[j].strip() for j in range(i - 2, -1, -1) if source[j].strip()), "")
            is_loop = prev.startswith("for(")
            stack.append((i, is_loop))
            if is_loop and not any(loop for _, loop in stack[:-1]):
                open_nest.append(i)
        elif text == "}" and stack:
            start, is_loop = stack.pop()
            if is_loop and not any(loop for _, loop in stack):
                first = open_nest.pop()
                for j in range(first, i + 1):
                    nest_of[j] = (first, i)
    return nest_of


def _part(names: set[str]) -> str:
    joined = " ".join(names)
    for key, part in (("experts.", "MoE experts"), ("router.", "MoE router"), ("lm_head", "output head"),
                      ("mlps.", "dense MLPs"), ("self_attn.", "attention projections")):
        if key in joined:
            return part
    return "other loops (attention over the cache, norms, softmax, routing glue)"


def attribute(graph, args, packed, seconds: float) -> None:
    samples = _sample(graph, args, seconds)
    graphs = collections.Counter(lib for _, lib in samples if lib.endswith(".main.so"))
    if not graphs:
        raise SystemExit("no samples in generated code (is cpp_wrapper off, or perf missing symbols?)")
    library = graphs.most_common(1)[0][0]  # the step's graph (a pinned copy may share its library)
    bias = _load_bias(library)
    source_path = library[: -len(".so")] + ".cpp"
    source = open(source_path).read().split("\n")
    ours = sorted({ip - bias for ip, lib in samples if lib == library})
    lines = subprocess.run(["addr2line", "-i", "-a", "-e", library], input="\n".join(hex(a) for a in ours),
                           capture_output=True, text=True).stdout.splitlines()
    line_of: dict[int, int] = {}
    address = None
    for text in lines:
        if text.startswith("0x"):
            address = int(text, 16)
        elif address is not None and address not in line_of and os.path.basename(source_path) in text:
            number = text.rsplit(":", 1)[1].split()[0]
            if number.isdigit():  # the innermost frame in the generated file: the loop body's line
                line_of[address] = int(number)
    nests = _loop_nests(source)
    spans = sorted((offset, offset + size, name) for name, (g, offset, size, shape) in packed.where.items()
                   if not name.startswith(C.NOT_IN_DECODE_GRAPH))

    @functools.cache
    def weights(first: int, last: int) -> frozenset[str]:
        body = "\n".join(source[first - 1 : last])
        found = set()
        for offset in map(int, re.findall(r"in_ptr\d+ \+ static_cast<int64_t>\((\d+)L \+", body)):
            found.update(name for lo, hi, name in spans if lo <= offset < hi)
        return frozenset(found)

    by_part: collections.Counter = collections.Counter()
    by_nest: collections.Counter = collections.Counter()
    for ip, lib in samples:
        if lib == library:
            nest = nests.get(line_of.get(ip - bias, -1))
            if nest is None:
                by_part["generated code outside loops (wrapper)"] += 1
                continue
            by_nest[nest] += 1
            by_part[_part(weights(*nest))] += 1
        else:
            name = os.path.basename(lib)
            group = ("OpenMP (waiting at barriers)" if "gomp" in name or "libomp" in name
                     else "Python, dynamo guards" if "python" in name
                     else "aten ops called by the graph, allocator" if any(k in name for k in ("torch_cpu", "c10", "libc.", "libm"))
                     else "other: " + name)
            by_part[group] += 1
    total = sum(by_part.values()) or 1
    print(f"\n{len(samples)} samples ({library})")
    for part, n in by_part.most_common():
        print(f"  {100 * n / total:5.1f}%  {part}")
    print("  top loop nests:")
    for (first, last), n in by_nest.most_common(12):
        names = sorted(weights(first, last))
        label = ", ".join(names)[:100] or "(no weights: activations only)"
        print(f"  {100 * n / total:5.1f}%  lines {first}-{last}: {label}")


def main() -> None:
    args = ARGS or parse_args()
    torch.set_num_threads(args.threads)
    variants = [("routed as trained", False)] + ([("pinned to 8 experts", True)] if args.pin_experts else [])
    overridden = "".join(f", {k}={v}" for k, v in args.overrides.items())
    print(f"compiled decode step, `small` preset{overridden}, batch {args.batch}, {args.cached} cached tokens, "
          f"{args.threads} thread(s); compiling ...", flush=True)
    for label, pinned in variants:
        graph, step_args, packed = build_step(args.batch, args.cached, pinned, args.overrides)
        ms = time_step(graph, step_args, args.rounds)
        print(f"{label:22s} {ms:7.3f} ms/step  ({args.batch / ms * 1e3:7.0f} tokens/s, graph only)", flush=True)
        if args.attribute:
            attribute(graph, step_args, packed, args.seconds)


if __name__ == "__main__":
    main()
