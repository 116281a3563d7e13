"""benchmarks/profile_decode_step.py: the loop-nest parser that attributes perf samples of the
generated code to the weights each loop reads (the perf run itself needs perf and is not tested)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_decode_step.py"

# the shape of inductor's generated C++: loop nests at function level, inner loops and plain blocks
# inside them, a one-line lambda with balanced braces, an OpenMP region holding two nests
GENERATED = """\
extern "C" void cpp_fused_0(const float* in_ptr0, float* out_ptr0)
{
    {
        #pragma GCC ivdep
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8192L); x0+=static_cast<int64_t>(1L))
        {
            {
                float tmp_acc0 = 0;
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(256L); x1+=static_cast<int64_t>(16L))
                {
                    auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(300L + x1 + 256L*x0), static_cast<int64_t>(16));
                }
                tmp_acc0 = at::vec::vec_reduce_all<float, 1>([](auto& x, auto& y) { return x + y; }, tmp_acc0_vec);
            }
        }
    }
    #pragma omp parallel num_threads(2)
    {
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(96L); x0+=static_cast<int64_t>(1L))
            {
                auto tmp9 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(20L + x0), static_cast<int64_t>(16));
            }
        }
    }
}
"""


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("profile_decode_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_line_of_a_loop_nest_maps_to_its_outermost_loop(tool):
    source = GENERATED.split("\n")
    nests = tool._loop_nests(source)
    first = source.index(next(line for line in source if "8192L" in line)) + 2  # the "{" after the for
    load = source.index(next(line for line in source if "300L" in line)) + 1
    reduce_line = source.index(next(line for line in source if "vec_reduce_all" in line)) + 1
    assert nests[load] == nests[reduce_line] == nests[first]  # inner loop and lambda: same nest
    start, end = nests[first]
    assert source[start - 1].strip() == "{" and source[end - 1].strip() == "}" and start == first
    parallel = source.index(next(line for line in source if "20L + x0" in line)) + 1
    assert nests[parallel] != nests[first]  # the loop inside the OpenMP region is a nest of its own
    assert "#pragma omp parallel" not in "\n".join(source[nests[parallel][0] - 1 : nests[parallel][1]])
    outside = [i for i, line in enumerate(source, 1) if line.startswith("extern") or "omp parallel" in line]
    assert all(i not in nests for i in outside)


def test_loop_nests_are_named_by_the_weights_they_read(tool):
    assert tool._part({"layers.0.mlp.experts.gate_up_proj"}) == "MoE experts"
    assert tool._part({"layers.1.mlp.router.classifier.weight"}) == "MoE router"
    assert tool._part({"lm_head.weight"}) == "output head"
    assert tool._part({"layers.2.mlps.1.up_proj.weight"}) == "dense MLPs"
    assert tool._part({"layers.0.self_attn.1.q_a_proj.weight"}) == "attention projections"
    assert tool._part(set()).startswith("other loops")
