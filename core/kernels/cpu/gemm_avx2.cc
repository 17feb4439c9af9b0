// The AVX2 + FMA level of the batch-invariant GEMM (see gemm.h).
#include <immintrin.h>

#include "core/kernels/cpu/gemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace dmoe::core::gemm {
namespace {

struct Isa {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMaxMr = 6;
  // 16 ymm registers: 12 accumulators + 2 weight vectors + 1 broadcast for
  // 6 rows; 8 accumulators for 1-2 rows (decode streams several panels).
  static constexpr int NpFor(int mr) { return mr == 1 ? 4 : mr == 2 ? 2 : 1; }
  static V Zero() { return _mm256_setzero_ps(); }
  static V LoadF(const float* p) { return _mm256_loadu_ps(p); }
  static V LoadB(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static V Bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

#include "core/kernels/cpu/internal/gemm_kernel.inc"

}  // namespace

void RunAvx2(const Args& a) { RunLevel(a); }

}  // namespace dmoe::core::gemm

#pragma GCC pop_options
