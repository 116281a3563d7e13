// Few-row weight products for CPU decoding: y (M, N) = x (M, K) @ w (N, K)^T, M <= 8.
//
// At decode a step multiplies each weight matrix by a handful of rows (one per sequence in flight),
// so the product streams the weights from memory once and does M multiply-adds per weight. The loop
// below is the shape inductor generates for these products (one weight row per pass, one vector
// accumulator per input row, a horizontal sum per output), plus one thing inductor does not emit:
// a software prefetch, into L2, of the weight row ~16 KB ahead. With eight rows the hardware
// prefetchers fall behind the arithmetic; measured on this project's Zen 4 core, the prefetch takes
// an 8-row product over the 8 MB output head from 0.86 to 0.46 ms (docs/INFERENCE.md).
//
// Built on first use by longcat/infer/kernels.py with -march=native; AVX-512F or AVX2+FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kAheadBytes = 16384;  // prefetch distance
constexpr int64_t kChunkBytes = 65536;  // weights per parallel task, at least

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload_first(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int64_t kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload_first(const float* p, int64_t n) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones + 8 - n)));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "rows_linear needs AVX-512F or AVX2 with FMA (longcat.infer.kernels checks before building)"
#endif

// Output rows [n0, n1). The accumulators must stay in registers: any access to them by a run-time
// index (a scalar tail loop, say) makes the compiler keep them in memory, which halves the speed.
template <int M>
void rows_kernel(const float* x, const float* w, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
  const int64_t ahead = std::max<int64_t>(1, (kAheadBytes + 4 * K - 1) / (4 * K));  // weight rows
  const int64_t full = K - K % kLanes;
  const int64_t rest = K % kLanes;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    const char* next = reinterpret_cast<const char*>(w + std::min(n + ahead, N - 1) * K);
    Vec acc[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = vzero();
    for (int64_t k = 0; k < full; k += kLanes) {
      _mm_prefetch(next + 4 * k, _MM_HINT_T1);
      const Vec wv = vload(wn + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = vfma(wv, vload(x + m * K + k), acc[m]);
    }
    if (rest) {
      _mm_prefetch(next + 4 * full, _MM_HINT_T1);
      const Vec wv = vload_first(wn + full, rest);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m] = vfma(wv, vload_first(x + m * K + full, rest), acc[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) y[m * N + n] = vsum(acc[m]);
  }
}

using Kernel = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr Kernel kKernels[8] = {rows_kernel<1>, rows_kernel<2>, rows_kernel<3>, rows_kernel<4>,
                                rows_kernel<5>, rows_kernel<6>, rows_kernel<7>, rows_kernel<8>};

at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "longcat::rows_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "longcat::rows_linear: float32 only, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "longcat::rows_linear: x (rows, in) and w (out, in), got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "longcat::rows_linear: the weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "longcat::rows_linear: x has ", K, " columns, the weight ", w.size(1));
  TORCH_CHECK(M >= 1 && M <= 8, "longcat::rows_linear: 1 to 8 rows, got ", M);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (N == 0 || K == 0) return y.zero_();
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Kernel kernel = kKernels[M - 1];
  const int64_t grain = std::max<int64_t>(1, kChunkBytes / (4 * K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { kernel(xp, wp, yp, n0, n1, N, K); });
  return y;
}

at::Tensor rows_linear_meta(const at::Tensor& x, const at::Tensor& w) {
  return at::empty({x.size(0), w.size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY(longcat, m) {
  m.def("rows_linear(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(longcat, CPU, m) { m.impl("rows_linear", &rows_linear); }
TORCH_LIBRARY_IMPL(longcat, Meta, m) { m.impl("rows_linear", &rows_linear_meta); }
