#include "core/kernels/cpu/swiglu.h"

// GCC 12 reports its own _mm512_undefined_*() temporaries inside the
// intrinsics headers as maybe-uninitialized once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/isa.h"

namespace dmoe::core {
namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;
// p * 2^n is formed as (p * 2^a) * 2^b, a = clamp(n, -125, 127), b = n - a:
// the first product is exact (p is in [0.7, 1.42], so p * 2^a stays normal)
// and both powers are normal, so the only rounding is the last one, as with
// vscalefps. Beyond [kMinN, kMaxN] the result is 0 or inf either way.
constexpr float kMinN = -251.0f;
constexpr float kMaxN = 254.0f;
// exp(x) is 0 below kMinX (e^-104 < 2^-149 / 2) and inf above kMaxX (e^89 >
// FLT_MAX); x is clamped to [kMinX, kMaxX] first, where the range reduction
// is accurate (for |x| ~ 1e10 and beyond, x - n ln2 is not small any more).
// A NaN becomes kMinX (max returns its second operand): NaN * u stays NaN.
constexpr float kMinX = -104.0f;
constexpr float kMaxX = 89.0f;

float Pow2(int32_t e) {  // e in [-126, 127]
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float ExpScalar(float x) {
  x = std::fmin(std::fmax(x, kMinX), kMaxX);
  float n = std::nearbyint(x * kLog2e);
  float r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  float p = kP0;
  p = std::fma(p, r, kP1);
  p = std::fma(p, r, kP2);
  p = std::fma(p, r, kP3);
  p = std::fma(p, r, kP4);
  p = std::fma(p, r, kP5);
  p = std::fma(p, r * r, r + 1.0f);
  if (std::isnan(n)) return p;  // NaN in, NaN out (p is NaN too)
  n = std::fmin(std::fmax(n, kMinN), kMaxN);
  const int32_t e = static_cast<int32_t>(n);
  const int32_t a = e < -125 ? -125 : e > 127 ? 127 : e;
  return p * Pow2(a) * Pow2(e - a);
}

__attribute__((target("avx2,fma"))) __m256 Pow2Avx2(__m256i e) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

__attribute__((target("avx2,fma"))) __m256 ExpAvx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kMinX)), _mm256_set1_ps(kMaxX));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // NaN n (NaN x): p is NaN already; clamp it to anything, the product stays
  // NaN. (vmaxps/vminps return the second operand for a NaN first one.)
  n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(kMinN)), _mm256_set1_ps(kMaxN));
  const __m256i e = _mm256_cvtps_epi32(n);
  const __m256i a =
      _mm256_min_epi32(_mm256_max_epi32(e, _mm256_set1_epi32(-125)), _mm256_set1_epi32(127));
  return _mm256_mul_ps(_mm256_mul_ps(p, Pow2Avx2(a)), Pow2Avx2(_mm256_sub_epi32(e, a)));
}

__attribute__((target("avx2,fma"))) __m256 SwiGlu8(__m256 g, __m256 u) {
  const __m256 e = ExpAvx2(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

// exp as above; vscalefps scales by 2^n with one rounding (and handles
// overflow and underflow).
__attribute__((target("avx512f"))) inline __m512 ExpAvx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kMinX)), _mm512_set1_ps(kMaxX));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) inline __m512 SwiGlu16(__m512 g, __m512 u) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m512 e = ExpAvx512(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), sign)));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

float SwiGluScalar(float g, float u) { return g / (1.0f + ExpScalar(-g)) * u; }

}  // namespace

void SwiGluRowGeneric(const float* gu, float* h, int64_t inter) {
  for (int64_t j = 0; j < inter; ++j) h[j] = SwiGluScalar(gu[j], gu[inter + j]);
}

__attribute__((target("avx2,fma"))) void SwiGluRowAvx2(const float* gu, float* h, int64_t inter) {
  int64_t j = 0;
  for (; j + 8 <= inter; j += 8) {
    _mm256_storeu_ps(h + j, SwiGlu8(_mm256_loadu_ps(gu + j), _mm256_loadu_ps(gu + inter + j)));
  }
  for (; j < inter; ++j) h[j] = SwiGluScalar(gu[j], gu[inter + j]);
}

__attribute__((target("avx512f"))) void SwiGluRowAvx512(const float* gu, float* h, int64_t inter) {
  int64_t j = 0;
  for (; j + 16 <= inter; j += 16) {
    _mm512_storeu_ps(h + j, SwiGlu16(_mm512_loadu_ps(gu + j), _mm512_loadu_ps(gu + inter + j)));
  }
  if (j < inter) {
    const __mmask16 m = static_cast<__mmask16>((1u << (inter - j)) - 1);
    _mm512_mask_storeu_ps(
        h + j, m,
        SwiGlu16(_mm512_maskz_loadu_ps(m, gu + j), _mm512_maskz_loadu_ps(m, gu + inter + j)));
  }
}

void SwiGluRow(const float* gu, float* h, int64_t inter) {
  static const IsaLevel level = ActiveIsa();
  if (static_cast<int>(level) >= static_cast<int>(IsaLevel::kAvx512)) {
    SwiGluRowAvx512(gu, h, inter);
  } else if (level == IsaLevel::kAvx2) {
    SwiGluRowAvx2(gu, h, inter);
  } else {
    SwiGluRowGeneric(gu, h, inter);
  }
}

}  // namespace dmoe::core
