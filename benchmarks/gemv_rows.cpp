// How much of a cold weight stream a few-row product keeps, with and without software prefetch.
//
// The compiled decode step's weight products are multiply-and-sum loops over (out, in) weight rows
// (docs/INFERENCE.md). This measures that loop shape on its own, for the `small` preset's output head
// (8192 x 256 fp32, 8 MB), on weights that are cold (eight copies cycled: 64 MB, twice the L3) and hot
// (L2-resident), at 1, 2, 4 and 8 input rows, plain and with the row 8 ahead prefetched into L2. It
// prints each time, the bandwidth it implies, and the batch gain rows x t(1 row) / t(rows), against the
// 1-row loop of the same kind measured in the same run: the ceiling a batched step gets from it.
//
//   g++ -O3 -march=native -o /tmp/gemv_rows benchmarks/gemv_rows.cpp && /tmp/gemv_rows
//
// Needs AVX-512F (x86-64).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

// y[m, n] = sum_k x[m, k] w[n, k] for M rows; one weight row per pass, M accumulators
template <int M, bool PREFETCH>
__attribute__((noinline)) void rows_gemv(const float* x, const float* w, float* y, int N, int K) {
  constexpr int kAhead = 8;  // rows
  for (int n = 0; n < N; ++n) {
    const float* wn = w + static_cast<size_t>(n) * K;
    const float* ahead = w + static_cast<size_t>(std::min(n + kAhead, N - 1)) * K;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
      if (PREFETCH) __builtin_prefetch(ahead + k, 0, 1);  // locality 1: into L2, not L1
      const __m512 wv = _mm512_loadu_ps(wn + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main() {
  const int N = 8192, K = 256, copies = 8;
  const double bytes = static_cast<double>(N) * K * 4;
  std::vector<float*> weights;
  for (int i = 0; i < copies; ++i) {
    float* w = static_cast<float*>(aligned_alloc(64, static_cast<size_t>(bytes)));
    for (size_t j = 0; j < static_cast<size_t>(N) * K; ++j) w[j] = static_cast<float>(j % 7) * 0.1f;
    weights.push_back(w);
  }
  float* x = static_cast<float*>(aligned_alloc(64, 8 * K * 4));
  for (int j = 0; j < 8 * K; ++j) x[j] = 0.01f * static_cast<float>(j);
  float* y = static_cast<float*>(aligned_alloc(64, 8 * static_cast<size_t>(N) * 4));

  // best of 5 passes over all copies (cold), and the same loop over 256 rows repeated (hot)
  auto cold = [&](auto fn) {
    double best = 1e9;
    for (int r = 0; r < 5; ++r) {
      const double t = now();
      for (int i = 0; i < 4 * copies; ++i) fn(weights[i % copies], N);
      best = std::min(best, (now() - t) / (4 * copies));
    }
    return best;
  };
  auto hot = [&](auto fn) {
    double best = 1e9;
    for (int r = 0; r < 50; ++r) {
      const double t = now();
      for (int i = 0; i < 32; ++i) fn(weights[0], 256);
      best = std::min(best, now() - t);
    }
    return best;  // 32 x 256 rows = one full pass over N rows
  };
  double base[2] = {0, 0};  // the 1-row cold time, plain and prefetching
  std::printf("output head %d x %d fp32 (%.1f MB), one core\n", N, K, bytes / 1e6);
  std::printf("%-20s %9s %7s %8s %13s\n", "loop", "cold ms", "GB/s", "hot ms", "batch gain");
  auto row = [&](const char* name, int rows, bool prefetch, auto fn) {
    const double c = cold(fn), h = hot(fn);
    if (rows == 1) base[prefetch] = c;
    std::printf("%-20s %9.3f %7.1f %8.3f %12.2fx\n", name, c * 1e3, bytes / c / 1e9, h * 1e3,
                rows * base[prefetch] / c);
  };
#define ROW(M, P, NAME) row(NAME, M, P, [&](const float* w, int n) { rows_gemv<M, P>(x, w, y, n, K); });
  ROW(1, false, "1 row")
  ROW(1, true, "1 row, prefetch")
  ROW(2, false, "2 rows")
  ROW(2, true, "2 rows, prefetch")
  ROW(4, false, "4 rows")
  ROW(4, true, "4 rows, prefetch")
  ROW(8, false, "8 rows")
  ROW(8, true, "8 rows, prefetch")
  return 0;
}
