// Weight packing and the generic (baseline x86-64, SSE2) level of the
// batch-invariant GEMM; the AVX2 and AVX-512 levels are gemm_avx2.cc and
// gemm_avx512.cc, the same kernel body (internal/gemm_kernel.inc) compiled
// for their targets.
#include "core/kernels/cpu/gemm.h"

#include <emmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "core/dtype.h"

namespace dmoe::core::gemm {

template <typename T, typename F>
static void Pack(const float* w, int64_t n, int64_t k, T* out, F convert) {
  const int64_t panels = NumPanels(n);
  for (int64_t p = 0; p < panels; ++p) {
    T* dst = out + p * k * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t row = p * kPanel + c;
      if (row < n) {
        const float* src = w + row * k;
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + c] = convert(src[kk]);
      } else {
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + c] = T{};
      }
    }
  }
}

void PackF32(const float* w, int64_t n, int64_t k, float* out) {
  Pack(w, n, k, out, [](float v) { return v; });
}

void PackBf16(const float* w, int64_t n, int64_t k, uint16_t* out) {
  Pack(w, n, k, out, [](float v) { return F32ToBF16(v); });
}

void PackBf16Pairs(const float* w, int64_t n, int64_t k, uint16_t* out) {
  const int64_t panels = NumPanels(n), pairs = NumPairs(k);
  constexpr uint16_t kMinusZero = 0x8000;
  for (int64_t p = 0; p < panels; ++p) {
    uint16_t* dst = out + p * pairs * 2 * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t row = p * kPanel + c;
      const float* src = w + row * k;
      for (int64_t j = 0; j < pairs; ++j) {
        uint16_t* word = dst + (j * kPanel + c) * 2;  // [0] low half, [1] high
        if (row >= n) {
          word[0] = word[1] = 0;
          continue;
        }
        word[1] = F32ToBF16(src[2 * j]);
        word[0] = 2 * j + 1 < k ? F32ToBF16(src[2 * j + 1]) : kMinusZero;
      }
    }
  }
}

bool PackInt8(const float* w, int64_t n, int64_t k, int8_t* out, float* scales) {
  const int64_t panels = NumPanels(n);
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t kk = 0; kk < k; ++kk) {
      if (!std::isfinite(w[row * k + kk])) return false;
    }
  }
  for (int64_t p = 0; p < panels; ++p) {
    int8_t* dst = out + p * k * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t row = p * kPanel + c;
      if (row >= n) {
        scales[row] = 0.0f;
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + c] = 0;
        continue;
      }
      const float* src = w + row * k;
      float amax = 0.0f;
      for (int64_t kk = 0; kk < k; ++kk) amax = std::max(amax, std::fabs(src[kk]));
      const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
      scales[row] = scale;
      for (int64_t kk = 0; kk < k; ++kk) {
        const float q = std::round(src[kk] / scale);
        dst[kk * kPanel + c] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
      }
    }
  }
  return true;
}

void PackXPairs(const float* x, int64_t k, uint32_t* out) {
  const int64_t pairs = NumPairs(k);
  for (int64_t j = 0; j < pairs; ++j) {
    const uint32_t hi = F32ToBF16(x[2 * j]);
    const uint32_t lo = 2 * j + 1 < k ? F32ToBF16(x[2 * j + 1]) : 0;
    out[j] = hi << 16 | lo;
  }
}

namespace {

// SSE2: no FMA, so the product is rounded before the add.
struct Isa {
  using V = __m128;
  static constexpr int kLanes = 4;
  static constexpr int kMaxMr = 3;
  static constexpr int NpFor(int mr) { return mr == 1 ? 2 : 1; }
  static V Zero() { return _mm_setzero_ps(); }
  static V LoadF(const float* p) { return _mm_loadu_ps(p); }
  static V LoadB(const uint16_t* p) {
    // bf16 bits into the high half of each 32-bit lane.
    return _mm_castsi128_ps(_mm_unpacklo_epi16(
        _mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static constexpr bool kSplitBf16 = false;
  static void LoadB2(const uint16_t*, V*, V*) {}
  static void LoadEvenOdd(const float*, V*, V*) {}
  static void StoreEvenOdd(float*, V, V) {}
  static V LoadI8(const int8_t* p) {
    int32_t four;
    std::memcpy(&four, p, sizeof(four));
    __m128i v = _mm_cvtsi32_si128(four);
    v = _mm_unpacklo_epi8(v, v);   // each byte twice
    v = _mm_unpacklo_epi16(v, v);  // each byte four times: the top byte of a lane
    return _mm_cvtepi32_ps(_mm_srai_epi32(v, 24));
  }
  static V Bcast(const float* p) { return _mm_set1_ps(*p); }
  static V Fma(V a, V b, V c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static V Mul(V a, V b) { return _mm_mul_ps(a, b); }
  static void Store(float* p, V v) { _mm_storeu_ps(p, v); }
};

#include "core/kernels/cpu/internal/gemm_kernel.inc"

}  // namespace

void RunGeneric(const Args& a) { RunLevel(a); }

}  // namespace dmoe::core::gemm
