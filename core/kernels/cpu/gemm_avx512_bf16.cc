// The AVX-512 kernels for bf16 weights packed in k pairs (PackBf16Pairs; see
// gemm.h), one body for two modes:
// - RunAvx512Bf16 (AVX512_BF16): one vdpbf16ps per pair of k and 16 columns,
//   x packed the same way (PackXPairs). vdpbf16ps adds the high half's product
//   (k = 2j) before the low half's (k = 2j + 1): no widening of the weights
//   (the 64-byte load feeds it directly) and 32 multiply-adds per instruction.
// - RunAvx512Pairs (AVX-512F, no BF16): the 64-byte load gives the 16 columns'
//   k = 2j weights by a mask and their k = 2j + 1 weights by a shift, two
//   instructions for 32 weights (the panel layout needs a widening shuffle and
//   a shift per 16), then two FMAs with x[2j] and x[2j + 1] (f32, from x/ldx).
// Either way each output is one chain over k = 0, 1, ... in order, so rows do
// not depend on M, on register blocks or on the panel split, and the bits are
// those of the other levels (products of bf16 values are exact in f32), except
// for subnormals under vdpbf16ps (gemm.h).
#include <immintrin.h>

#include "core/kernels/cpu/gemm.h"

// GCC 12 reports its own _mm512_undefined_*() temporaries inside the
// intrinsics headers as maybe-uninitialized once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

namespace dmoe::core::gemm {
namespace {

enum class Mode { kDp, kFma };

// Register blocks (32 zmm registers). kDp: MR * NP accumulators + NP weight
// vectors + 1 broadcast; decode (1-3 rows) streams 6-8 panels at once to keep
// enough loads in flight. Up to 12 rows pass over the weights once: an
// expert's few-row batch (T = 64 gives 6 rows per V2-Lite expert on average,
// often 7-12) then overlaps its compute with the one memory stream. With 6-row
// blocks, 7-12 rows took the panel-group path, whose second block computes
// from L2 while memory idles: one expert's gate|up (2816 x 2048) at 8 rows
// read 26-28 GB/s instead of 33 on Zen 5 (one thread). 12 x 2 blocks match
// 6 x 4 at large M. kFma: MR * NP accumulators + 3 NP weight vectors (loaded,
// k = 2j, k = 2j + 1) + 2 broadcasts.
template <Mode M>
constexpr int kMaxMr = M == Mode::kDp ? 12 : 8;
template <Mode M>
constexpr int NpFor(int mr) {
  if constexpr (M == Mode::kDp) {
    return mr == 1 ? 8 : mr <= 3 ? 6 : mr <= 6 ? 4 : mr <= 8 ? 3 : 2;
  } else {
    return mr == 1 ? 6 : mr == 2 ? 5 : mr <= 4 ? 3 : 2;
  }
}
// Elements of one pair step of one panel (16 columns x 2 k): 64 bytes.
constexpr int64_t kStep = 2 * kPanel;
// As the FMA levels (gemm_kernel.inc): weights prefetched 2 KiB ahead in every
// panel stream, and large M by panel groups of about 256 KiB kept in L2.
constexpr int64_t kPrefetchElems = 2048 / sizeof(uint16_t);
constexpr int64_t kGroupBytes = int64_t{256} << 10;

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// One pair step of one row: acc[p] += the row's two products with panel p.
// kDp reads the row's PackXPairs word, kFma its two f32 values.
template <Mode M, int NP>
inline void Step(const void* xrow, int64_t j, const __m512i* wv, __m512* acc) {
  if constexpr (M == Mode::kDp) {
    const __m512bh xb = reinterpret_cast<__m512bh>(
        _mm512_set1_epi32(static_cast<int>(static_cast<const uint32_t*>(xrow)[j])));
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      acc[p] = _mm512_dpbf16_ps(acc[p], xb, reinterpret_cast<__m512bh>(wv[p]));
    }
  } else {
    const float* x = static_cast<const float*>(xrow) + 2 * j;
    const __m512 xe = _mm512_set1_ps(x[0]), xo = _mm512_set1_ps(x[1]);
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      acc[p] = _mm512_fmadd_ps(
          xe, _mm512_castsi512_ps(_mm512_and_si512(wv[p], _mm512_set1_epi32(-65536))), acc[p]);
    }
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      acc[p] = _mm512_fmadd_ps(xo, _mm512_castsi512_ps(_mm512_slli_epi32(wv[p], 16)), acc[p]);
    }
  }
}

// y[r, p*16 + c] for r < MR, p < NP over all k; with `from_y` the chains
// continue from y. x: row r at x + r * ldx (kDp: PackXPairs words; kFma:
// floats).
template <Mode M, int MR, int NP>
void Micro(const uint16_t* w, int64_t pstride, int64_t k, const void* x, int64_t ldx, float* y,
           int64_t ldy, bool from_y) {
  const int64_t pairs = NumPairs(k);
  // kFma reads x[2j + 1] in each full pair only; an odd K's last k runs alone.
  const int64_t full = M == Mode::kDp ? pairs : k / 2;
  const size_t xbytes = M == Mode::kDp ? sizeof(uint32_t) : sizeof(float);
  __m512 acc[MR][NP];
#pragma GCC unroll 64
  for (int i = 0; i < MR * NP; ++i) {
    const int r = i / NP, p = i % NP;
    acc[r][p] = from_y ? _mm512_loadu_ps(y + r * ldy + p * kPanel) : _mm512_setzero_ps();
  }
  const char* xb = static_cast<const char*>(x);
  for (int64_t j = 0; j < full; ++j) {
    __m512i wv[NP];
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      const uint16_t* wp = w + p * pstride + j * kStep;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchElems), _MM_HINT_T0);
      wv[p] = _mm512_loadu_si512(wp);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) Step<M, NP>(xb + r * ldx * xbytes, j, wv, acc[r]);
  }
  if (full < pairs) {  // kFma, odd K: k - 1 (the high halves) alone
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 xe = _mm512_set1_ps(static_cast<const float*>(x)[r * ldx + k - 1]);
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) {
        const __m512i v = _mm512_loadu_si512(w + p * pstride + full * kStep);
        acc[r][p] = _mm512_fmadd_ps(
            xe, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))), acc[r][p]);
      }
    }
  }
#pragma GCC unroll 64
  for (int i = 0; i < MR * NP; ++i) {
    const int r = i / NP, p = i % NP;
    _mm512_storeu_ps(y + r * ldy + p * kPanel, acc[r][p]);
  }
}

// Rows [r0, r0 + MR) x panels [p0, p0 + np), np <= NP; a block reaching past
// column n goes through a tile (padded columns computed, never stored).
template <Mode M, int MR, int NP>
void Block(const Args& a, int64_t r0, int64_t p0, int np) {
  if constexpr (NP > 1) {
    if (np < NP) return Block<M, MR, NP - 1>(a, r0, p0, np);
  }
  const int64_t pstride = NumPairs(a.k) * kStep;
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + p0 * pstride;
  const int64_t ldx = M == Mode::kDp ? a.ldxp : a.ldx;
  const void* x = M == Mode::kDp ? static_cast<const void*>(a.xpairs + r0 * ldx)
                                 : static_cast<const void*>(a.x + r0 * ldx);
  const int64_t c0 = p0 * kPanel;
  if (c0 + NP * kPanel <= a.n) {
    Micro<M, MR, NP>(w, pstride, a.k, x, ldx, a.y + r0 * a.ldy + c0, a.ldy, a.accumulate);
    return;
  }
  alignas(64) float tile[MR][NP * kPanel];
  const int64_t cols = a.n - c0;
  if (a.accumulate) {
    for (int r = 0; r < MR; ++r) {
      __builtin_memcpy(tile[r], a.y + (r0 + r) * a.ldy + c0, cols * sizeof(float));
      for (int64_t c = cols; c < NP * kPanel; ++c) tile[r][c] = 0.0f;
    }
  }
  Micro<M, MR, NP>(w, pstride, a.k, x, ldx, &tile[0][0], NP * kPanel, a.accumulate);
  for (int r = 0; r < MR; ++r) {
    __builtin_memcpy(a.y + (r0 + r) * a.ldy + c0, tile[r], cols * sizeof(float));
  }
}

// mr (<= MR) rows from r0, np (<= NpFor(mr)) panels from p0.
template <Mode M, int MR>
void RowBlock(const Args& a, int64_t r0, int mr, int64_t p0, int np) {
  if constexpr (MR > 1) {
    if (mr < MR) return RowBlock<M, MR - 1>(a, r0, mr, p0, np);
  }
  Block<M, MR, NpFor<M>(MR)>(a, r0, p0, np);
}

template <Mode M>
void Run(const Args& a) {
  constexpr int kMr = kMaxMr<M>;
  const int64_t pb = a.panel_begin, pe = a.panel_end;
  if (a.m <= kMr) {
    // Decode: one pass over the weights, every row in registers.
    const int mr = static_cast<int>(a.m);
    const int np = NpFor<M>(mr);
    for (int64_t p = pb; p < pe; p += np) {
      RowBlock<M, kMr>(a, 0, mr, p, static_cast<int>(Min(np, pe - p)));
    }
    return;
  }
  // Large M: a group of panels meets every row block before the next group
  // is read (each weight read from memory once per call).
  const int np = NpFor<M>(kMr);
  int64_t group = kGroupBytes / (NumPairs(a.k) * kStep * static_cast<int64_t>(sizeof(uint16_t)));
  group = group < np ? np : group / np * np;
  for (int64_t g0 = pb; g0 < pe; g0 += group) {
    const int64_t g1 = Min(pe, g0 + group);
    for (int64_t r = 0; r < a.m; r += kMr) {
      const int mr = static_cast<int>(Min(kMr, a.m - r));
      for (int64_t p = g0; p < g1; p += np) {
        RowBlock<M, kMr>(a, r, mr, p, static_cast<int>(Min(np, g1 - p)));
      }
    }
  }
}

}  // namespace

void RunAvx512Bf16(const Args& a) { Run<Mode::kDp>(a); }

void RunAvx512Pairs(const Args& a) { Run<Mode::kFma>(a); }

}  // namespace dmoe::core::gemm

#pragma GCC pop_options
