// The AVX2 + FMA level of the batch-invariant GEMM (see gemm.h).
#include <immintrin.h>

#include <type_traits>

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
  // One 32-byte load of 16 bf16 weights: the even columns by a shift, the odd
  // ones by a mask (see kSplit in the kernel body).
  static constexpr bool kSplitBf16 = true;
  static void LoadB2(const uint16_t* p, V* even, V* odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536)));
  }
  // 16 floats in column order <-> even and odd columns.
  static void LoadEvenOdd(const float* p, V* even, V* odd) {
    const V a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    const V lo = _mm256_permute2f128_ps(a, b, 0x20);  // columns 0-3 | 8-11
    const V hi = _mm256_permute2f128_ps(a, b, 0x31);  // columns 4-7 | 12-15
    *even = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
    *odd = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
  static void StoreEvenOdd(float* p, V even, V odd) {
    const V lo = _mm256_unpacklo_ps(even, odd);  // columns 0-3 | 8-11
    const V hi = _mm256_unpackhi_ps(even, odd);  // columns 4-7 | 12-15
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  static V LoadI8(const int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V Bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

#include "core/kernels/cpu/internal/gemm_kernel.inc"

}  // namespace

void RunAvx2(const Args& a) { RunLevel(a); }

}  // namespace dmoe::core::gemm

#pragma GCC pop_options
