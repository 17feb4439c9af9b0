// The AVX512_BF16 level of the batch-invariant GEMM for bf16 weights (see
// gemm.h): one vdpbf16ps per pair of k and 16 columns, on weights packed in k
// pairs (PackBf16Pairs) and x packed the same way (PackXPairs). Each output is
// still one chain over k = 0, 1, ... in order (vdpbf16ps adds the high half's
// product, k = 2j, before the low half's, k = 2j + 1), so rows do not depend on
// M, on register blocks or on the panel split, and the bits are those of the
// FMA levels (products of bf16 values are exact in f32) except for subnormals.
//
// Against the AVX-512 FMA level this halves the instructions per weight: no
// widening of bf16 weights (the 64-byte load feeds vdpbf16ps directly) and 32
// multiply-adds per instruction instead of 16.
#include <immintrin.h>

#include "core/kernels/cpu/gemm.h"

// GCC 12 reports its own _mm512_undefined_*() temporaries inside the
// intrinsics headers as maybe-uninitialized once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace dmoe::core::gemm {
namespace {

// 32 zmm registers: MR * NP accumulators + NP weight vectors + 1 broadcast.
// Decode (1-3 rows) streams 6-8 panels at once to keep enough loads in flight.
// Up to 12 rows pass over the weights once: an expert's few-row batch (T = 64
// gives 6 rows per V2-Lite expert on average, often 7-12) then overlaps its
// compute with the one memory stream. With 6-row blocks, 7-12 rows took the
// panel-group path, whose second block computes from L2 while memory idles:
// one expert's gate|up (2816 x 2048) at 8 rows read 26-28 GB/s instead of
// 33 on Zen 5 (one thread). 12 x 2 blocks match 6 x 4 at large M.
constexpr int kMaxMr = 12;
constexpr int NpFor(int mr) {
  return mr == 1 ? 8 : mr <= 3 ? 6 : mr <= 6 ? 4 : mr <= 8 ? 3 : 2;
}
// Elements of one pair step of one panel (16 columns x 2 k): 64 bytes.
constexpr int64_t kStep = 2 * kPanel;
// As the FMA levels (gemm_kernel.inc): weights prefetched 2 KiB ahead in every
// panel stream, and large M by panel groups of about 256 KiB kept in L2.
constexpr int64_t kPrefetchElems = 2048 / sizeof(uint16_t);
constexpr int64_t kGroupBytes = int64_t{256} << 10;

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// y[r, p*16 + c] for r < MR, p < NP over all `pairs`; with `from_y` the
// chains continue from y.
template <int MR, int NP>
void Micro(const uint16_t* w, int64_t pstride, int64_t pairs, const uint32_t* x, int64_t ldx,
           float* y, int64_t ldy, bool from_y) {
  __m512 acc[MR][NP];
#pragma GCC unroll 64
  for (int i = 0; i < MR * NP; ++i) {
    const int r = i / NP, p = i % NP;
    acc[r][p] = from_y ? _mm512_loadu_ps(y + r * ldy + p * kPanel) : _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh wv[NP];
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      const uint16_t* wp = w + p * pstride + j * kStep;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchElems), _MM_HINT_T0);
      wv[p] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wp));
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh xb = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(x[r * ldx + j])));
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], xb, wv[p]);
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
template <int MR, int NP>
void Block(const Args& a, int64_t r0, int64_t p0, int np) {
  if constexpr (NP > 1) {
    if (np < NP) return Block<MR, NP - 1>(a, r0, p0, np);
  }
  const int64_t pairs = NumPairs(a.k);
  const int64_t pstride = pairs * kStep;
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + p0 * pstride;
  const uint32_t* x = a.xpairs + r0 * a.ldxp;
  const int64_t c0 = p0 * kPanel;
  if (c0 + NP * kPanel <= a.n) {
    Micro<MR, NP>(w, pstride, pairs, x, a.ldxp, a.y + r0 * a.ldy + c0, a.ldy, a.accumulate);
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
  Micro<MR, NP>(w, pstride, pairs, x, a.ldxp, &tile[0][0], NP * kPanel, a.accumulate);
  for (int r = 0; r < MR; ++r) {
    __builtin_memcpy(a.y + (r0 + r) * a.ldy + c0, tile[r], cols * sizeof(float));
  }
}

// mr (<= MR) rows from r0, np (<= NpFor(mr)) panels from p0.
template <int MR>
void RowBlock(const Args& a, int64_t r0, int mr, int64_t p0, int np) {
  if constexpr (MR > 1) {
    if (mr < MR) return RowBlock<MR - 1>(a, r0, mr, p0, np);
  }
  Block<MR, NpFor(MR)>(a, r0, p0, np);
}

}  // namespace

void RunAvx512Bf16(const Args& a) {
  const int64_t pb = a.panel_begin, pe = a.panel_end;
  if (a.m <= kMaxMr) {
    // Decode: one pass over the weights, every row in registers.
    const int mr = static_cast<int>(a.m);
    const int np = NpFor(mr);
    for (int64_t p = pb; p < pe; p += np) {
      RowBlock<kMaxMr>(a, 0, mr, p, static_cast<int>(Min(np, pe - p)));
    }
    return;
  }
  // Large M: a group of panels meets every row block before the next group
  // is read (each weight read from memory once per call).
  const int np = NpFor(kMaxMr);
  int64_t group = kGroupBytes / (NumPairs(a.k) * kStep * static_cast<int64_t>(sizeof(uint16_t)));
  group = group < np ? np : group / np * np;
  for (int64_t g0 = pb; g0 < pe; g0 += group) {
    const int64_t g1 = Min(pe, g0 + group);
    for (int64_t r = 0; r < a.m; r += kMaxMr) {
      const int mr = static_cast<int>(Min(kMaxMr, a.m - r));
      for (int64_t p = g0; p < g1; p += np) {
        RowBlock<kMaxMr>(a, r, mr, p, static_cast<int>(Min(np, g1 - p)));
      }
    }
  }
}

}  // namespace dmoe::core::gemm

#pragma GCC pop_options
