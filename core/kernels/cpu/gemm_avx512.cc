// The AVX-512 level of the batch-invariant GEMM (see gemm.h): the same chains
// as the AVX2 level, 16 lanes wide, so the same bits.
#include <immintrin.h>

#include <type_traits>

#include "core/kernels/cpu/gemm.h"

// GCC 12 reports its own _mm512_undefined_*() temporaries inside the
// intrinsics headers as maybe-uninitialized once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

namespace dmoe::core::gemm {
namespace {

struct Isa {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMaxMr = 6;
  // 32 zmm registers: 12-16 accumulators leave room for the weight vectors.
  static constexpr int NpFor(int mr) { return mr == 1 ? 8 : mr <= 3 ? 4 : 2; }
  static V Zero() { return _mm512_setzero_ps(); }
  static V LoadF(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadB(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static constexpr bool kSplitBf16 = false;
  static void LoadB2(const uint16_t*, V*, V*) {}
  static void LoadEvenOdd(const float*, V*, V*) {}
  static void StoreEvenOdd(float*, V, V) {}
  static V LoadI8(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V Bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
};

#include "core/kernels/cpu/internal/gemm_kernel.inc"

}  // namespace

void RunAvx512(const Args& a) { RunLevel(a); }

}  // namespace dmoe::core::gemm

#pragma GCC pop_options
