// Pack/unpack run on every expert call (a profile put them at ~18% of an expert
// server's CPU), so each conversion has AVX-512 and AVX2 kernels picked at run
// time (the binary must still run on plain x86-64), next to the scalar code
// they must equal bit for bit: the scalar kernels are the element functions of
// core/dtype, and the SIMD ones do the same integer arithmetic on the float
// bits (see the comments at each), so NaN, Inf, denormals and values rounding
// to Inf come out identical. core/wire_test.cc checks every kernel set against
// a copy of the original scalar codec on all 2^16 upper halves x several lower
// halves of float bit patterns, plus random ones.
//
// AVX-512 bf16 conversion instructions (vcvtneps2bf16) are not used: they
// flush denormal inputs to zero, which F32ToBF16 does not.
#include "common/wire.h"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/isa.h"

#if defined(__x86_64__)
// GCC 12 reports its own _mm512_undefined_*() temporaries inside the intrinsics
// headers as (maybe-)uninitialized once inlined (as in kernels/cpu/linear.cc);
// the diagnostic is located in the header, so it is silenced before the include.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define DMOE_WIRE_X86 1
#endif

namespace dmoe::common {
namespace {

// One implementation of each bulk conversion. The unpack kernels return
// whether every float they wrote is finite (the caller then finds the first
// one that is not, for the message).
struct Kernels {
  void (*to_bf16)(const float* x, int64_t n, uint16_t* o);
  float (*max_abs)(const float* x, int64_t n);  // max |x|, NaNs skipped (as std::max)
  void (*to_f8)(const float* x, int64_t n, float inv,
                uint8_t* o);  // core::F32ToF8E4M3Fast(x * inv)
  bool (*from_bf16)(const char* in, int64_t n, float* out);
  bool (*from_f8)(const char* in, int64_t n, float s, float* out);  // core::F8E4M3ToF32(in) * s
  bool (*from_f32)(const char* in, int64_t n, float* out);
};

// ---- Scalar: the reference semantics ----

void ToBf16Scalar(const float* x, int64_t n, uint16_t* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = core::F32ToBF16(x[i]);
}

float MaxAbsScalar(const float* x, int64_t n) {
  float mx = 0;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(x[i]));
  return mx;
}

void ToF8Scalar(const float* x, int64_t n, float inv, uint8_t* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = core::F32ToF8E4M3Fast(x[i] * inv);
}

bool AllFiniteScalar(const float* out, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(out[i]);
  return ok;
}

bool FromBf16Scalar(const char* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t v;
    std::memcpy(&v, in + 2 * i, 2);
    out[i] = core::BF16ToF32(v);
  }
  return AllFiniteScalar(out, n);
}

bool FromF8Scalar(const char* in, int64_t n, float s, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = core::F8E4M3ToF32(static_cast<uint8_t>(in[i])) * s;
  return AllFiniteScalar(out, n);
}

bool FromF32Scalar(const char* in, int64_t n, float* out) {
  if (n) std::memcpy(out, in, static_cast<size_t>(n) * 4);
  return AllFiniteScalar(out, n);
}

constexpr Kernels kScalar = {ToBf16Scalar,   MaxAbsScalar, ToF8Scalar,
                             FromBf16Scalar, FromF8Scalar, FromF32Scalar};

// Bit constants shared by the SIMD kernels.
constexpr int32_t kAbsMask = 0x7fffffff;
constexpr int32_t kExpMask = 0x7f800000;      // also +Inf: larger magnitudes are NaN
constexpr int32_t kF8Saturate = 0x43e00000;   // 448.0f: at or above -> 0x7e
constexpr int32_t kF8MinNormal = 0x3c800000;  // 2^-6: below -> e4m3 subnormal
constexpr int32_t kF8Rebias = 120 << 23;      // f32 exponent bias 127 -> e4m3 bias 7
constexpr int32_t kQuietNaN = 0x7fc00000;     // std::nanf(""), what F8E4M3ToF32 returns

#ifdef DMOE_WIRE_X86

// ---- AVX-512 (F + BW + VL: masked 8/16-bit tails) ----
#define DMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// F32ToBF16 on 16 lanes: u + 0x7fff + lsb, or the quieted NaN; then >> 16.
DMOE_AVX512 inline __m512i Bf16Bits512(__m512i u) {
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(kAbsMask)),
                                                _mm512_set1_epi32(kExpMask));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_srli_epi32(r, 16);
}

DMOE_AVX512 void ToBf16Avx512(const float* x, int64_t n, uint16_t* o) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i a = Bf16Bits512(_mm512_loadu_si512(x + i));
    const __m512i b = Bf16Bits512(_mm512_loadu_si512(x + i + 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), _mm512_cvtepi32_epi16(a));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i + 16), _mm512_cvtepi32_epi16(b));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_cvtepi32_storeu_epi16(o + i, m, Bf16Bits512(_mm512_maskz_loadu_epi32(m, x + i)));
  }
}

// vmaxps(a, b) returns b unless a > b, so a NaN in `a` keeps the running max,
// as std::max(mx, |x|) does; the max of non-NaN values is order-independent.
DMOE_AVX512 float MaxAbsAvx512(const float* x, int64_t n) {
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), m0);
    m1 = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i + 16)), m1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    m0 = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i)), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

// F32ToF8E4M3Fast on 16 lanes, case by case on |y|'s bits (integer compares
// order non-negative floats): normal rounding by bit arithmetic, subnormals by
// the current rounding mode (vcvtps2dq, as nearbyint), then saturation, sign
// and NaN (0x7f whatever the sign).
DMOE_AVX512 inline __m512i F8Code512(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(kAbsMask));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(a, _mm512_add_epi32(_mm512_set1_epi32(0x7ffff), lsb));
  r = _mm512_srli_epi32(_mm512_sub_epi32(r, _mm512_set1_epi32(kF8Rebias)), 20);
  // min() keeps large lanes (not used) from overflowing the conversion.
  const __m512 small = _mm512_min_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(0x1p-6f));
  const __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(small, _mm512_set1_ps(512.0f)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(kF8MinNormal)), sub);
  r = _mm512_mask_mov_epi32(r, _mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(kF8Saturate)),
                            _mm512_set1_epi32(0x7e));
  r = _mm512_or_si512(r, _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80)));
  return _mm512_mask_mov_epi32(r, _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(kExpMask)),
                               _mm512_set1_epi32(0x7f));
}

DMOE_AVX512 void ToF8Avx512(const float* x, int64_t n, float inv, uint8_t* o) {
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i c = F8Code512(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtepi32_epi8(c));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512i c = F8Code512(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vinv));
    _mm512_mask_cvtepi32_storeu_epi8(o + i, m, c);
  }
}

// Stores 16 floats (as bits) and folds their exponent fields into `exp_max`:
// some lane is Inf or NaN iff a lane of exp_max ends up equal to kExpMask.
DMOE_AVX512 inline void Store512(float* out, __mmask16 m, __m512i bits, __m512i* exp_max) {
  _mm512_mask_storeu_epi32(out, m, bits);
  *exp_max = _mm512_max_epu32(*exp_max, _mm512_and_si512(bits, _mm512_set1_epi32(kExpMask)));
}

DMOE_AVX512 inline bool Finite512(__m512i exp_max) {
  return _mm512_cmpeq_epi32_mask(exp_max, _mm512_set1_epi32(kExpMask)) == 0;
}

DMOE_AVX512 bool FromBf16Avx512(const char* in, int64_t n, float* out) {
  __m512i exp_max = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(m, in + 2 * i);
    Store512(out + i, m, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16), &exp_max);
  }
  return Finite512(exp_max);
}

// F8E4M3ToF32 on 16 lanes: exponent 0 is man * 2^-9 (exact in f32), else the
// bits move into place and the exponent is rebiased; S.1111.111 is +NaN.
DMOE_AVX512 inline __m512 F8Value512(__m512i c) {
  const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7f));
  __m512i r = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(kF8Rebias));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
  r = _mm512_mask_mov_epi32(r, _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(8)),
                            _mm512_castps_si512(sub));
  r = _mm512_or_si512(r, _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24));
  r = _mm512_mask_mov_epi32(r, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)),
                            _mm512_set1_epi32(kQuietNaN));
  return _mm512_castsi512_ps(r);
}

DMOE_AVX512 bool FromF8Avx512(const char* in, int64_t n, float s, float* out) {
  const __m512 vs = _mm512_set1_ps(s);
  __m512i exp_max = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, in + i));
    Store512(out + i, m, _mm512_castps_si512(_mm512_mul_ps(F8Value512(c), vs)), &exp_max);
  }
  return Finite512(exp_max);
}

DMOE_AVX512 bool FromF32Avx512(const char* in, int64_t n, float* out) {
  __m512i exp_max = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    Store512(out + i, m, _mm512_maskz_loadu_epi32(m, in + 4 * i), &exp_max);
  }
  return Finite512(exp_max);
}

constexpr Kernels kAvx512 = {ToBf16Avx512,   MaxAbsAvx512, ToF8Avx512,
                             FromBf16Avx512, FromF8Avx512, FromF32Avx512};

// ---- AVX2: the same arithmetic on 8 lanes, signed compares (every operand is
// at most 0x7fffffff), scalar tails ----
#define DMOE_AVX2 __attribute__((target("avx2")))

DMOE_AVX2 inline __m256i Bf16Bits256(__m256i u) {
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(kAbsMask)),
                                         _mm256_set1_epi32(kExpMask));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  return _mm256_srli_epi32(r, 16);
}

DMOE_AVX2 void ToBf16Avx2(const float* x, int64_t n, uint16_t* o) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = Bf16Bits256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    const __m256i b = Bf16Bits256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 8)));
    // packus works per 128-bit lane: [a0-3 b0-3 | a4-7 b4-7] -> reorder quads.
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), p);
  }
  ToBf16Scalar(x + i, n - i, o + i);
}

DMOE_AVX2 float MaxAbsAvx2(const float* x, int64_t n) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(kAbsMask));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs), m0);
    m1 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i + 8), abs), m1);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
  m = _mm_max_ps(m, _mm_max_ps(_mm256_castps256_ps128(m1), _mm256_extractf128_ps(m1, 1)));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, 1));
  return std::max(_mm_cvtss_f32(m), MaxAbsScalar(x + i, n - i));
}

DMOE_AVX2 inline __m256i F8Code256(__m256 y) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(kAbsMask));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(a, _mm256_add_epi32(_mm256_set1_epi32(0x7ffff), lsb));
  r = _mm256_srli_epi32(_mm256_sub_epi32(r, _mm256_set1_epi32(kF8Rebias)), 20);
  const __m256 small = _mm256_min_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(0x1p-6f));
  const __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(small, _mm256_set1_ps(512.0f)));
  r = _mm256_blendv_epi8(r, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(kF8MinNormal), a));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7e),
                         _mm256_cmpgt_epi32(a, _mm256_set1_epi32(kF8Saturate - 1)));
  r = _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7f),
                            _mm256_cmpgt_epi32(a, _mm256_set1_epi32(kExpMask)));
}

DMOE_AVX2 void ToF8Avx2(const float* x, int64_t n, float inv, uint8_t* o) {
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i c[4];
    for (int k = 0; k < 4; ++k)
      c[k] = F8Code256(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vinv));
    // Codes fit in a byte, so the saturating packs only narrow; per 128-bit
    // lane the dwords come out as c0lo c1lo c2lo c3lo | c0hi c1hi c2hi c3hi.
    const __m256i b =
        _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    const __m256i p = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), p);
  }
  ToF8Scalar(x + i, n - i, inv, o + i);
}

DMOE_AVX2 inline void Store256(float* out, __m256i bits, __m256i* exp_max) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bits);
  *exp_max = _mm256_max_epu32(*exp_max, _mm256_and_si256(bits, _mm256_set1_epi32(kExpMask)));
}

DMOE_AVX2 inline bool Finite256(__m256i exp_max) {
  return _mm256_movemask_epi8(_mm256_cmpeq_epi32(exp_max, _mm256_set1_epi32(kExpMask))) == 0;
}

DMOE_AVX2 bool FromBf16Avx2(const char* in, int64_t n, float* out) {
  __m256i exp_max = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i));
    Store256(out + i, _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16), &exp_max);
  }
  const bool tail = FromBf16Scalar(in + 2 * i, n - i, out + i);
  return Finite256(exp_max) && tail;
}

DMOE_AVX2 inline __m256 F8Value256(__m256i c) {
  const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7f));
  __m256i r = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(kF8Rebias));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0x1p-9f));
  r = _mm256_blendv_epi8(r, _mm256_castps_si256(sub),
                         _mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
  r = _mm256_or_si256(r, _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(kQuietNaN),
                         _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f)));
  return _mm256_castsi256_ps(r);
}

DMOE_AVX2 bool FromF8Avx2(const char* in, int64_t n, float s, float* out) {
  const __m256 vs = _mm256_set1_ps(s);
  __m256i exp_max = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i c =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i)));
    Store256(out + i, _mm256_castps_si256(_mm256_mul_ps(F8Value256(c), vs)), &exp_max);
  }
  const bool tail = FromF8Scalar(in + i, n - i, s, out + i);
  return Finite256(exp_max) && tail;
}

DMOE_AVX2 bool FromF32Avx2(const char* in, int64_t n, float* out) {
  __m256i exp_max = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    Store256(out + i, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + 4 * i)), &exp_max);
  }
  const bool tail = FromF32Scalar(in + 4 * i, n - i, out + i);
  return Finite256(exp_max) && tail;
}

constexpr Kernels kAvx2 = {ToBf16Avx2, MaxAbsAvx2, ToF8Avx2, FromBf16Avx2, FromF8Avx2, FromF32Avx2};

#endif  // DMOE_WIRE_X86

// Kernel sets by level: 0 scalar, 1 AVX2, 2 AVX-512.
int BestLevel() {
#ifdef DMOE_WIRE_X86
  // core/isa.h: the host's level capped by DMOE_MAX_ISA (its avx512 level
  // includes F, BW and VL).
  if (core::IsaAtLeast(core::IsaLevel::kAvx512)) return 2;
  if (core::IsaAtLeast(core::IsaLevel::kAvx2)) return 1;
#endif
  return 0;
}

std::atomic<int> forced_level{-1};  // SetWireKernelsForTesting

const Kernels& Active() {
  static const int best = BestLevel();
  const int forced = forced_level.load(std::memory_order_relaxed);
  switch (forced >= 0 ? forced : best) {
#ifdef DMOE_WIRE_X86
    case 2:
      return kAvx512;
    case 1:
      return kAvx2;
#endif
    default:
      return kScalar;
  }
}

}  // namespace

namespace wire_internal {

// Test seam, declared again in core/wire_test.cc (not part of wire.h): makes
// Pack/UnpackActivations use the scalar (0), AVX2 (1) or AVX-512 (2) kernels,
// or the best this CPU has (-1). Returns false, changing nothing, when the CPU
// lacks the level. Not for use while other threads pack or unpack.
bool SetWireKernelsForTesting(int level) {
  if (level > BestLevel()) return false;
  forced_level.store(level, std::memory_order_relaxed);
  return true;
}

}  // namespace wire_internal

namespace {

// The fp8 scale of a row whose largest magnitude is `max_abs` (wire.h).
float F8RowScale(float max_abs) {
  // Below 448 * 2^-126 the scale would be denormal (or 0), and below
  // 448 * 2^-128 its inverse overflows to Inf: zeros then packed as
  // 0 * Inf = NaN. FLT_MIN (2^-126) keeps 1 / scale = 2^126 finite and exact,
  // so x * (1 / scale) is exact too and such rows land on the same e4m3 grid
  // (normal or subnormal codes, or 0) as x / scale would. An Inf max stays an
  // Inf scale, which UnpackActivations refuses.
  return max_abs > 0 ? std::max(max_abs / 448.0f, FLT_MIN) : 1.0f;
}

// What F8RowScale can return for a finite row: a positive normal float.
bool IsValidF8RowScale(float scale) { return std::isnormal(scale) && scale > 0; }

}  // namespace

size_t WireElementSize(WireDType t) {
  switch (t) {
    case WireDType::kBF16:
      return 2;
    case WireDType::kF32:
      return 4;
    case WireDType::kF8E4M3:
      return 1;
  }
  return 0;
}

void PackActivations(const float* x, int64_t rows, int64_t cols, int64_t ld, WireDType type,
                     std::string* data, std::string* scales) {
  if (ld == 0) ld = cols;
  data->resize(static_cast<size_t>(rows * cols) * WireElementSize(type));
  scales->clear();
  char* out = data->data();
  const Kernels& k = Active();
  switch (type) {
    case WireDType::kF32:
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * cols * 4, x + r * ld, cols * 4);
      return;
    case WireDType::kBF16: {
      auto* o = reinterpret_cast<uint16_t*>(out);
      if (ld == cols) {
        k.to_bf16(x, rows * cols, o);
        return;
      }
      for (int64_t r = 0; r < rows; ++r) k.to_bf16(x + r * ld, cols, o + r * cols);
      return;
    }
    case WireDType::kF8E4M3: {
      scales->resize(static_cast<size_t>(rows) * 4);
      auto* o = reinterpret_cast<uint8_t*>(out);
      for (int64_t r = 0; r < rows; ++r) {
        const float mx = k.max_abs(x + r * ld, cols);
        const float scale = F8RowScale(mx);
        std::memcpy(scales->data() + r * 4, &scale, 4);
        k.to_f8(x + r * ld, cols, 1.0f / scale, o + r * cols);
      }
      return;
    }
  }
}

absl::Status UnpackActivations(WireDType type, std::string_view data, std::string_view scales,
                               int64_t rows, int64_t cols, float* out) {
  if (rows < 0 || cols < 0) return absl::InvalidArgumentError("activations: negative shape");
  // Counts come from the peer: bound them before any size arithmetic, so that
  // nothing below wraps (the kernels take int64 counts; fp8 has 4 bytes of
  // scale per row even when cols is 0).
  const int64_t es = static_cast<int64_t>(WireElementSize(type));
  int64_t n, bytes, scale_bytes = 0;
  if (__builtin_mul_overflow(rows, cols, &n) || __builtin_mul_overflow(n, es, &bytes) ||
      (type == WireDType::kF8E4M3 && __builtin_mul_overflow(rows, int64_t{4}, &scale_bytes))) {
    return absl::InvalidArgumentError(absl::StrCat("activations: [", rows, ", ", cols,
                                                   "] is too large (its byte count overflows)"));
  }
  if (data.size() != static_cast<uint64_t>(bytes)) {
    return absl::InvalidArgumentError(absl::StrCat("activations: [", rows, ", ", cols, "] needs ",
                                                   bytes, " bytes, got ", data.size()));
  }
  const Kernels& k = Active();
  bool finite = true;
  switch (type) {
    case WireDType::kF32:
      finite = k.from_f32(data.data(), n, out);
      break;
    case WireDType::kBF16:
      finite = k.from_bf16(data.data(), n, out);
      break;
    case WireDType::kF8E4M3: {
      if (scales.size() != static_cast<uint64_t>(scale_bytes)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "activations: fp8 needs ", scale_bytes, " bytes of row scales, got ", scales.size()));
      }
      for (int64_t r = 0; r < rows; ++r) {
        float s;
        std::memcpy(&s, scales.data() + r * 4, 4);
        if (!IsValidF8RowScale(s)) {
          return absl::InvalidArgumentError(
              absl::StrCat("activations: row ", r, " scale ", s,
                           " is not a positive normal float (PackActivations "
                           "writes >= 2^-126)"));
        }
        finite &= k.from_f8(data.data() + r * cols, cols, s, out + r * cols);
      }
      break;
    }
  }
  if (finite) return absl::OkStatus();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(out[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("activations: element ", i, " is not finite (", out[i], ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace dmoe::common
