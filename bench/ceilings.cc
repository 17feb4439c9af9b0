#include "bench/ceilings.h"

// GCC 12 flags its own _mm512_undefined_*() temporaries in the intrinsics
// headers as uninitialized once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "core/isa.h"

namespace dmoe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

__attribute__((target("avx512f"))) float SumAvx512(const float* p, size_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

__attribute__((target("avx2"))) float SumAvx2(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = 0;
  for (float l : lanes) s += l;
  for (; i < n; ++i) s += p[i];
  return s;
}

float SumPortable(const float* p, size_t n) {
  float acc[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
  }
  float s = 0;
  for (float a : acc) s += a;
  for (; i < n; ++i) s += p[i];
  return s;
}

// Peak f32 multiply-add rate of one thread: 12 independent chains (enough to
// cover the FMA latency on every x86 core) of `iters` steps, kept in
// registers. Returns the FLOPs done (2 per lane per step); `out` keeps the
// result alive. The chains converge to y / (1 - x), so nothing overflows or
// turns subnormal.
constexpr int kChains = 12;

__attribute__((target("avx512f"))) double FmaAvx512(int64_t iters, float* out) {
  __m512 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(0.001f * i);
  const __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) a[j] = _mm512_fmadd_ps(a[j], x, y);
  }
  __m512 s = a[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, a[i]);
  *out = _mm512_reduce_add_ps(s);
  return 2.0 * 16 * kChains * static_cast<double>(iters);
}

__attribute__((target("avx2,fma"))) double FmaAvx2(int64_t iters, float* out) {
  __m256 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(0.001f * i);
  const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) a[j] = _mm256_fmadd_ps(a[j], x, y);
  }
  __m256 s = a[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, a[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  *out = lanes[0];
  return 2.0 * 8 * kChains * static_cast<double>(iters);
}

// vdpbf16ps: 16 lanes x 2 bf16 products added per instruction (4 FLOP per lane).
// The products (1e-3 squared, in bf16) keep every chain normal and finite.
// 16 chains: with 12 (the FMA probe's) it read below what the GEMM kernel
// reaches on Zen 5.
constexpr int kDotChains = 16;
__attribute__((target("avx512f,avx512bf16"))) double DotBf16Avx512(int64_t iters, float* out) {
  __m512 a[kDotChains];
  for (int i = 0; i < kDotChains; ++i) a[i] = _mm512_set1_ps(0.001f * i);
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kDotChains; ++j) a[j] = _mm512_dpbf16_ps(a[j], x, x);
  }
  __m512 s = a[0];
  for (int i = 1; i < kDotChains; ++i) s = _mm512_add_ps(s, a[i]);
  *out = _mm512_reduce_add_ps(s);
  return 4.0 * 16 * kDotChains * static_cast<double>(iters);
}

// SSE2 has no FMA: a multiply and an add per step (what the generic kernels do).
double MulAddSse2(int64_t iters, float* out) {
  __m128 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm_set1_ps(0.001f * i);
  const __m128 x = _mm_set1_ps(0.999999f), y = _mm_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) a[j] = _mm_add_ps(_mm_mul_ps(a[j], x), y);
  }
  __m128 s = a[0];
  for (int i = 1; i < kChains; ++i) s = _mm_add_ps(s, a[i]);
  *out = _mm_cvtss_f32(s);
  return 2.0 * 4 * kChains * static_cast<double>(iters);
}

void FillUniform(std::vector<float>* v, float scale, std::mt19937* rng) {
  std::uniform_real_distribution<float> d(-scale, scale);
  for (float& f : *v) f = d(*rng);
}

}  // namespace

HostCeilings::HostCeilings(core::ComputeType type) {
  const size_t n = kProbeBytes / sizeof(float);
  probe_ = static_cast<float*>(std::aligned_alloc(size_t{2} << 20, kProbeBytes));
  madvise(probe_, kProbeBytes, MADV_HUGEPAGE);
  for (size_t i = 0; i < n; ++i) probe_[i] = static_cast<float>(i & 1023);
  std::vector<float> w(kGemmN * kGemmN);
  std::mt19937 rng(7);
  FillUniform(&w, 0.05f, &rng);
  x_.resize(kGemmN * kGemmN);
  y_.resize(kGemmN * kGemmN);
  FillUniform(&x_, 1.0f, &rng);
  // The ceiling is the best dense GEMM oneDNN has here, batch-invariant or
  // not (on AVX2: gemm:jit in f32 on bf16-rounded values).
  core::AllowBatchVariantOneDnnForBenchmarks(true);
  auto lin = core::PackedLinear::Create(w.data(), kGemmN, kGemmN, type);
  core::AllowBatchVariantOneDnnForBenchmarks(false);
  if (!lin.ok()) {
    std::fprintf(stderr, "GEMM ceiling: %s\n", std::string(lin.status().message()).c_str());
    std::exit(1);
  }
  gemm_ = *std::move(lin);
}

void HostCeilings::FreeProbe() {
  std::free(probe_);
  probe_ = nullptr;
}

double HostCeilings::ReadGBs(int threads, int reps) {
  static const bool kAvx512 = core::IsaAtLeast(core::IsaLevel::kAvx512);
  static const bool kAvx2 = core::IsaAtLeast(core::IsaLevel::kAvx2);
  const size_t n = kProbeBytes / sizeof(float);
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const int nt = omp_get_num_threads(), id = omp_get_thread_num();
      const size_t chunk = (n / nt) & ~size_t{63};
      const size_t begin = id * chunk, len = id == nt - 1 ? n - begin : chunk;
      total += kAvx512 ? SumAvx512(probe_ + begin, len)
               : kAvx2 ? SumAvx2(probe_ + begin, len)
                       : SumPortable(probe_ + begin, len);
    }
    best = std::max(best, kProbeBytes / SecondsSince(t0) / 1e9);
    sink = sink + total;
  }
  return best;
}

namespace {

// Best-of-`reps` GFLOP/s of `threads` OpenMP threads each running
// chains(iters, &out), a register-only peak probe returning the FLOPs it did.
double PeakGflops(int threads, int reps, double (*chains)(int64_t, float*)) {
  constexpr int64_t kIters = int64_t{1} << 22;  // ~10-40 ms per thread
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    double flops = 0;
    float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : flops, total)
    {
      float out = 0;
      flops += chains(kIters, &out);
      total += out;
    }
    best = std::max(best, flops / SecondsSince(t0) / 1e9);
    sink = sink + total;
  }
  return best;
}

}  // namespace

double HostCeilings::FmaGflops(int threads, int reps) {
  static const bool kAvx512 = core::IsaAtLeast(core::IsaLevel::kAvx512);
  static const bool kAvx2 = core::IsaAtLeast(core::IsaLevel::kAvx2);
  return PeakGflops(threads, reps, kAvx512 ? FmaAvx512 : kAvx2 ? FmaAvx2 : MulAddSse2);
}

double HostCeilings::Bf16DotGflops(int threads, int reps) {
  if (!core::IsaAtLeast(core::IsaLevel::kAvx512Bf16)) return 0;
  return PeakGflops(threads, reps, DotBf16Avx512);
}

double HostCeilings::GemmGflops(int reps) {
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    gemm_.Forward(x_.data(), kGemmN, y_.data());
    best = std::max(best, 2.0 * kGemmN * kGemmN * kGemmN / SecondsSince(t0) / 1e9);
  }
  return best;
}

}  // namespace dmoe::bench
