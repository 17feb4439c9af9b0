// The batch-invariant GEMM kernels (gemm.h) directly, at every ISA level the
// host has: against a float64 reference, bitwise across M, row offsets, panel
// splits and levels, and never writing past column n.
#include "core/kernels/cpu/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "core/dtype.h"
#include "core/isa.h"
#include "gtest/gtest.h"

namespace dmoe::core::gemm {
namespace {

struct Level {
  const char* name;
  Fn fn;
  IsaLevel needs;
  bool pairs = false;  // RunAvx512Pairs / RunAvx512Bf16: pair-packed weights
};

bool HostHas(IsaLevel level) { return static_cast<int>(HostIsa()) >= static_cast<int>(level); }

// The levels this host can run for f32 or bf16 weights (HostIsa, not the
// DMOE_MAX_ISA cap: the kernels are called directly here).
std::vector<Level> HostLevels(bool bf16) {
  std::vector<Level> out = {{"generic", RunGeneric, IsaLevel::kGeneric}};
  if (HostHas(IsaLevel::kAvx2)) out.push_back({"avx2", RunAvx2, IsaLevel::kAvx2});
  if (HostHas(IsaLevel::kAvx512)) out.push_back({"avx512", RunAvx512, IsaLevel::kAvx512});
  if (bf16 && HostHas(IsaLevel::kAvx512)) {
    out.push_back({"avx512_pairs", RunAvx512Pairs, IsaLevel::kAvx512, true});
  }
  if (bf16 && HostHas(IsaLevel::kAvx512Bf16)) {
    out.push_back({"avx512_bf16", RunAvx512Bf16, IsaLevel::kAvx512Bf16, true});
  }
  return out;
}

std::vector<float> Random(size_t n, uint32_t seed, bool bf16) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) {
    f = dist(rng);
    if (bf16) f = BF16ToF32(F32ToBF16(f));
  }
  return v;
}

struct Packed {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  std::vector<uint16_t> pairs;  // PackBf16Pairs
};

Packed Pack(const std::vector<float>& w, int64_t n, int64_t k) {
  Packed p;
  p.f32.resize(PackedElems(n, k));
  p.bf16.resize(PackedElems(n, k));
  p.pairs.resize(PackedPairElems(n, k));
  PackF32(w.data(), n, k, p.f32.data());
  PackBf16(w.data(), n, k, p.bf16.data());
  PackBf16Pairs(w.data(), n, k, p.pairs.data());
  return p;
}

// y = x W^T over panels [pb, pe), rows [0, m), with the given strides, at
// `level` (the pair level gets its own packing of w and of x).
void RunGemm(const Level& level, const Packed& p, bool bf16, int64_t n, int64_t k, const float* x,
             int64_t ldx, int64_t m, float* y, int64_t ldy, int64_t pb, int64_t pe,
             bool accumulate = false) {
  Args a;
  a.w = level.pairs ? static_cast<const void*>(p.pairs.data())
        : bf16      ? static_cast<const void*>(p.bf16.data())
                    : p.f32.data();
  a.bf16 = bf16;
  a.n = n;
  a.k = k;
  a.x = x;
  a.ldx = ldx;
  std::vector<uint32_t> xp;
  if (level.pairs) {
    const int64_t ldxp = NumPairs(k) + 3;  // a row stride of its own
    xp.assign(m * ldxp, 0xdeadbeef);
    for (int64_t r = 0; r < m; ++r) PackXPairs(x + r * ldx, k, xp.data() + r * ldxp);
    a.xpairs = xp.data();
    a.ldxp = ldxp;
  }
  a.y = y;
  a.ldy = ldy;
  a.m = m;
  a.panel_begin = pb;
  a.panel_end = pe;
  a.accumulate = accumulate;
  level.fn(a);
}

class GemmTest : public ::testing::TestWithParam<bool> {};  // bf16?

TEST_P(GemmTest, MatchesFloat64ReferenceAtEveryLevel) {
  const bool bf16 = GetParam();
  for (const auto& [m, n, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 1, 1},
                                                                                  {1, 16, 8},
                                                                                  {2, 17, 33},
                                                                                  {5, 100, 64},
                                                                                  {7, 48, 3},
                                                                                  {13, 130, 257},
                                                                                  {64, 64, 128},
                                                                                  {70, 33, 1000}}) {
    const auto w = Random(n * k, 1 + m, bf16);
    const auto x = Random(m * k, 2 + n, bf16);
    const Packed p = Pack(w, n, k);
    for (const Level& level : HostLevels(bf16)) {
      SCOPED_TRACE(absl::StrFormat("%s m=%d n=%d k=%d", level.name, m, n, k));
      std::vector<float> y(m * n);
      RunGemm(level, p, bf16, n, k, x.data(), k, m, y.data(), n, 0, NumPanels(n));
      int bad = 0;
      for (int64_t i = 0; i < m && bad < 5; ++i) {
        for (int64_t j = 0; j < n && bad < 5; ++j) {
          double ref = 0, scale = 0;
          for (int64_t q = 0; q < k; ++q) {
            const double prod = double{x[i * k + q]} * w[j * k + q];
            ref += prod;
            scale += std::fabs(prod);
          }
          // fp32 accumulation of k terms (inputs are exact: bf16 values are
          // pre-rounded, f32 ones used as they are).
          const double tol = 1e-5 * scale + 1e-30;
          if (!(std::fabs(y[i * n + j] - ref) <= tol)) {
            ADD_FAILURE() << "y[" << i << "," << j << "] = " << y[i * n + j] << ", expected " << ref
                          << " +- " << tol;
            ++bad;
          }
        }
      }
    }
  }
}

// Every row, computed in any batch, at any offset, in any panel split, gives
// the same bits; and columns past n (and past the caller's row) are untouched.
TEST_P(GemmTest, RowsAreBitwiseIndependentOfBatchSplitAndStride) {
  const bool bf16 = GetParam();
  // N and K tails, 6 panels; then a K long enough that the large-M path
  // splits the 7 panels into several panel groups (kGroupBytes of weights).
  for (const auto& [n, k, m] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{83, 301, 40}, {100, 1500, 40}}) {
    const auto w = Random(n * k, 7, bf16);
    const auto x = Random(m * k, 8, bf16);
    const Packed p = Pack(w, n, k);
    for (const Level& level : HostLevels(bf16)) {
      SCOPED_TRACE(absl::StrFormat("%s n=%d k=%d", level.name, n, k));
      std::vector<float> all(m * n);
      RunGemm(level, p, bf16, n, k, x.data(), k, m, all.data(), n, 0, NumPanels(n));
      std::mt19937 rng(99);
      for (int trial = 0; trial < 40; ++trial) {
        const int64_t rows = 1 + rng() % 31;
        const int64_t r0 = rng() % (m - rows + 1);
        const int64_t split = rng() % (NumPanels(n) + 1);
        const int64_t ldy = n + 5;  // canaries after every row
        std::vector<float> y(rows * ldy, -7.5f);
        RunGemm(level, p, bf16, n, k, x.data() + r0 * k, k, rows, y.data(), ldy, 0, split);
        RunGemm(level, p, bf16, n, k, x.data() + r0 * k, k, rows, y.data(), ldy, split,
                NumPanels(n));
        for (int64_t r = 0; r < rows; ++r) {
          ASSERT_EQ(0,
                    std::memcmp(y.data() + r * ldy, all.data() + (r0 + r) * n, n * sizeof(float)))
              << "rows " << r0 << "+" << rows << " split at panel " << split << ", row " << r;
          for (int64_t c = n; c < ldy; ++c) {
            ASSERT_EQ(y[r * ldy + c], -7.5f) << "wrote past column n at " << c;
          }
        }
      }
    }
  }
}

// AVX2 and AVX-512 run the same FMA chains; with bf16 inputs the product is
// exact, so the generic level (multiply, then add) gives those bits too.
TEST_P(GemmTest, LevelsGiveIdenticalBits) {
  const bool bf16 = GetParam();
  const auto levels = HostLevels(bf16);
  if (levels.size() < 2) GTEST_SKIP() << "only the generic level on this host";
  const int64_t n = 200, k = 515, m = 23;
  const auto w = Random(n * k, 11, bf16);
  const auto x = Random(m * k, 12, bf16);
  const Packed p = Pack(w, n, k);
  std::vector<float> ref(m * n);
  RunGemm(levels.back(), p, bf16, n, k, x.data(), k, m, ref.data(), n, 0, NumPanels(n));
  for (const Level& level : levels) {
    if (!bf16 && level.needs == IsaLevel::kGeneric) continue;  // no FMA
    std::vector<float> y(m * n);
    RunGemm(level, p, bf16, n, k, x.data(), k, m, y.data(), n, 0, NumPanels(n));
    EXPECT_EQ(0, std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)))
        << level.name << " vs " << levels.back().name;
  }
}

// W^T stored row-major as [k, ld] (e.g. the c_kv columns of an attention
// cache read in place): pstride = 16, kstride = ld runs the same chains as the
// packed layout, so the bits are identical, and nothing past column n or past
// the caller's row is written.
TEST_P(GemmTest, StridedInPlaceLayoutGivesThePackedBits) {
  const bool bf16 = GetParam();
  const int64_t n = 64, k = 77, ld = 72, m = 9;  // 4 panels; 8 extra columns per W^T row
  const auto w = Random(n * k, 21, bf16);
  const auto x = Random(m * k, 22, bf16);
  const Packed p = Pack(w, n, k);
  std::vector<float> wt_f(k * ld, 1e30f);
  std::vector<uint16_t> wt_b(k * ld, 0x7f80);  // +inf past column n: must never reach y
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t q = 0; q < k; ++q) {
      wt_f[q * ld + c] = w[c * k + q];
      wt_b[q * ld + c] = F32ToBF16(w[c * k + q]);
    }
  }
  for (const Level& level : HostLevels(bf16)) {
    if (level.pairs) continue;  // the pair level runs its packed layout only
    SCOPED_TRACE(level.name);
    std::vector<float> want(m * n);
    RunGemm(level, p, bf16, n, k, x.data(), k, m, want.data(), n, 0, NumPanels(n));
    for (int64_t split = 0; split <= NumPanels(n); ++split) {
      const int64_t ldy = n + 3;
      std::vector<float> y(m * ldy, -7.5f);
      for (const auto& [pb, pe] : {std::pair{int64_t{0}, split}, std::pair{split, NumPanels(n)}}) {
        Args a;
        a.w = bf16 ? static_cast<const void*>(wt_b.data()) : wt_f.data();
        a.bf16 = bf16;
        a.n = n;
        a.k = k;
        a.pstride = kPanel;
        a.kstride = ld;
        a.x = x.data();
        a.ldx = k;
        a.y = y.data();
        a.ldy = ldy;
        a.m = m;
        a.panel_begin = pb;
        a.panel_end = pe;
        level.fn(a);
      }
      for (int64_t r = 0; r < m; ++r) {
        ASSERT_EQ(0, std::memcmp(y.data() + r * ldy, want.data() + r * n, n * sizeof(float)))
            << "row " << r << ", split at panel " << split;
        for (int64_t c = n; c < ldy; ++c) ASSERT_EQ(y[r * ldy + c], -7.5f) << c;
      }
    }
  }
}

// K run in parts one after another, each continuing from y (accumulate),
// gives the bits of one run over the whole K, at any split, with N tails.
TEST_P(GemmTest, KInPartsWithAccumulateGivesOneRunsBits) {
  const bool bf16 = GetParam();
  const int64_t n = 45, k = 130;  // a partial last panel
  const auto w = Random(n * k, 31, bf16);
  const Packed p = Pack(w, n, k);
  std::mt19937 rng(5);
  for (const Level& level : HostLevels(bf16)) {
    if (level.pairs) continue;  // K windows of the pair layout: see the next test
    SCOPED_TRACE(level.name);
    for (int64_t m : {1, 4, 7, 19}) {
      const auto x = Random(m * k, 32 + m, bf16);
      std::vector<float> want(m * n);
      RunGemm(level, p, bf16, n, k, x.data(), k, m, want.data(), n, 0, NumPanels(n));
      for (int trial = 0; trial < 6; ++trial) {
        std::vector<int64_t> cuts = {0, k};
        for (int c = 0; c < trial; ++c) cuts.push_back(1 + rng() % (k - 1));
        std::sort(cuts.begin(), cuts.end());
        const int64_t ldy = n + 2;
        std::vector<float> y(m * ldy, 123.0f);  // overwritten by the first part
        for (size_t c = 0; c + 1 < cuts.size(); ++c) {
          const int64_t k0 = cuts[c], k1 = cuts[c + 1];
          if (k1 == k0) continue;
          Args a;
          a.bf16 = bf16;
          a.w = bf16 ? static_cast<const void*>(p.bf16.data() + k0 * kPanel)
                     : static_cast<const void*>(p.f32.data() + k0 * kPanel);
          a.pstride = k * kPanel;
          a.kstride = kPanel;
          a.n = n;
          a.k = k1 - k0;
          a.x = x.data() + k0;
          a.ldx = k;
          a.y = y.data();
          a.ldy = ldy;
          a.m = m;
          a.panel_end = NumPanels(n);
          a.accumulate = k0 > 0;
          level.fn(a);
        }
        for (int64_t r = 0; r < m; ++r) {
          ASSERT_EQ(0, std::memcmp(y.data() + r * ldy, want.data() + r * n, n * sizeof(float)))
              << "m=" << m << " row " << r << " with " << cuts.size() - 1 << " parts";
          for (int64_t c = n; c < ldy; ++c) ASSERT_EQ(y[r * ldy + c], 123.0f);
        }
      }
    }
  }
}

// accumulate continues every chain from y: at every level (the pair level
// included) the bits are the same, for decode and large-M shapes with tails.
TEST_P(GemmTest, AccumulateContinuesFromYAtEveryLevel) {
  const bool bf16 = GetParam();
  const auto levels = HostLevels(bf16);
  for (const auto& [m, n, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 45, 33}, {5, 130, 64}, {19, 45, 131}}) {
    const auto w = Random(n * k, 41, bf16);
    const auto x = Random(m * k, 42, bf16);
    const auto y0 = Random(m * n, 43, true);
    const Packed p = Pack(w, n, k);
    std::vector<float> ref;
    for (const Level& level : levels) {
      if (!bf16 && level.needs == IsaLevel::kGeneric) continue;  // no FMA
      SCOPED_TRACE(absl::StrFormat("%s m=%d n=%d k=%d", level.name, m, n, k));
      std::vector<float> y = y0;
      RunGemm(level, p, bf16, n, k, x.data(), k, m, y.data(), n, 0, NumPanels(n), true);
      if (ref.empty()) {
        ref = y;
        // A chain from y is y + the chain's products: not what a run from 0 gives.
        std::vector<float> from0(m * n);
        RunGemm(level, p, bf16, n, k, x.data(), k, m, from0.data(), n, 0, NumPanels(n));
        EXPECT_NE(0, std::memcmp(from0.data(), y.data(), y.size() * sizeof(float)));
        double err = 0, norm = 0;
        for (size_t i = 0; i < y.size(); ++i) {
          err += std::fabs(double{y[i]} - (double{from0[i]} + y0[i]));
          norm += std::fabs(double{y[i]});
        }
        EXPECT_LT(err, 1e-5 * norm);
      }
      EXPECT_EQ(0, std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)));
    }
  }
}

TEST(GemmPackTest, PairLayoutHoldsEvenKHighOddKLowAndPads) {
  const int64_t n = 18, k = 5;  // a partial panel and an odd K
  std::vector<float> w(n * k);
  for (int64_t i = 0; i < n * k; ++i) w[i] = 1.0f + i * 0.001f;
  std::vector<uint16_t> b(PackedPairElems(n, k), 0x1234);
  ASSERT_EQ(b.size(), 2u * 16 * 2 * 3);
  PackBf16Pairs(w.data(), n, k, b.data());
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t j = 0; j < 3; ++j) {
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t row = p * 16 + c;
        const size_t at = ((p * 3 + j) * 16 + c) * 2;
        const uint16_t hi = row < n ? F32ToBF16(w[row * k + 2 * j]) : 0;
        const uint16_t lo = row >= n        ? 0
                            : 2 * j + 1 < k ? F32ToBF16(w[row * k + 2 * j + 1])
                                            : 0x8000;
        EXPECT_EQ(b[at + 1], hi) << row << "," << j;
        EXPECT_EQ(b[at], lo) << row << "," << j;
      }
    }
  }
  const float x[3] = {1.5f, -2.0f, 3.0f};
  uint32_t xp[2];
  PackXPairs(x, 3, xp);
  EXPECT_EQ(xp[0], uint32_t{F32ToBF16(1.5f)} << 16 | F32ToBF16(-2.0f));
  EXPECT_EQ(xp[1], uint32_t{F32ToBF16(3.0f)} << 16);
}

// int8 weights (PackInt8): y = (chain of x * q) * scale at every level, within
// fp32 accumulation error of a float64 reference on the same q and scales;
// every level gives the same bits (exact products, the same chains); a row's
// bits do not depend on the batch or the panel split.
TEST(GemmInt8Test, MatchesReferenceAndIsBitwiseAcrossLevelsBatchesAndSplits) {
  for (const auto& shape : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 16, 8}, {5, 100, 64}, {7, 48, 3}, {13, 130, 257}, {40, 100, 1500}}) {
    // Plain variables: clang 14 does not let the lambda below capture bindings.
    const int64_t m = std::get<0>(shape), n = std::get<1>(shape), k = std::get<2>(shape);
    SCOPED_TRACE(absl::StrFormat("m=%d n=%d k=%d", m, n, k));
    const auto w = Random(n * k, 51 + n, false);
    const auto x = Random(m * k, 52 + k, true);
    std::vector<int8_t> q(PackedElems(n, k));
    std::vector<float> scales(NumPanels(n) * kPanel);
    ASSERT_TRUE(PackInt8(w.data(), n, k, q.data(), scales.data()));
    auto run = [&](Fn fn, const float* xr, int64_t rows, float* y, int64_t ldy, int64_t pb,
                   int64_t pe) {
      Args a;
      a.w = q.data();
      a.int8 = true;
      a.scales = scales.data();
      a.n = n;
      a.k = k;
      a.x = xr;
      a.ldx = k;
      a.y = y;
      a.ldy = ldy;
      a.m = rows;
      a.panel_begin = pb;
      a.panel_end = pe;
      fn(a);
    };
    std::vector<float> ref_bits;
    for (const Level& level : HostLevels(false)) {
      SCOPED_TRACE(level.name);
      std::vector<float> y(m * n);
      run(level.fn, x.data(), m, y.data(), n, 0, NumPanels(n));
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double ref = 0, mag = 0;
          for (int64_t c = 0; c < k; ++c) {
            const double prod =
                double{x[i * k + c]} * q[(j / kPanel * k + c) * kPanel + j % kPanel];
            ref += prod;
            mag += std::fabs(prod);
          }
          ref *= scales[j];
          mag *= scales[j];
          ASSERT_LE(std::fabs(y[i * n + j] - ref), 1e-5 * mag + 1e-30) << i << "," << j;
        }
      }
      if (ref_bits.empty()) {
        ref_bits = y;
      } else {
        EXPECT_EQ(0, std::memcmp(y.data(), ref_bits.data(), y.size() * sizeof(float)));
      }
      std::mt19937 rng(7);
      for (int trial = 0; trial < 10; ++trial) {
        const int64_t rows = 1 + rng() % m, r0 = rng() % (m - rows + 1);
        const int64_t split = rng() % (NumPanels(n) + 1);
        const int64_t ldy = n + 3;
        std::vector<float> part(rows * ldy, -7.5f);
        run(level.fn, x.data() + r0 * k, rows, part.data(), ldy, 0, split);
        run(level.fn, x.data() + r0 * k, rows, part.data(), ldy, split, NumPanels(n));
        for (int64_t r = 0; r < rows; ++r) {
          ASSERT_EQ(0, std::memcmp(part.data() + r * ldy, ref_bits.data() + (r0 + r) * n,
                                   n * sizeof(float)))
              << "rows " << r0 << "+" << rows << " split " << split;
          for (int64_t c = n; c < ldy; ++c) ASSERT_EQ(part[r * ldy + c], -7.5f);
        }
      }
    }
  }
}

TEST(GemmPackTest, Int8IsSymmetricPerRowAndRejectsNonFinite) {
  const int64_t n = 18, k = 4;  // a partial second panel
  std::vector<float> w(n * k, 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    if (r == 3) continue;  // an all-zero row: scale 1, q 0
    for (int64_t c = 0; c < k; ++c) w[r * k + c] = (c - 1.5f) * (r + 1) * 0.01f;
  }
  std::vector<int8_t> q(PackedElems(n, k), 99);
  std::vector<float> scales(NumPanels(n) * kPanel, -1.0f);
  ASSERT_TRUE(PackInt8(w.data(), n, k, q.data(), scales.data()));
  for (int64_t r = 0; r < 2 * kPanel; ++r) {
    if (r >= n) {
      EXPECT_EQ(scales[r], 0.0f);
      for (int64_t c = 0; c < k; ++c) EXPECT_EQ(q[(r / kPanel * k + c) * kPanel + r % kPanel], 0);
      continue;
    }
    const float amax = 1.5f * (r + 1) * 0.01f;
    EXPECT_FLOAT_EQ(scales[r], r == 3 ? 1.0f : amax / 127.0f) << r;
    for (int64_t c = 0; c < k; ++c) {
      const int want = r == 3 ? 0 : static_cast<int>(std::round(w[r * k + c] / scales[r]));
      EXPECT_EQ(q[(r / kPanel * k + c) * kPanel + r % kPanel], want) << r << "," << c;
    }
    if (r != 3) {  // the largest magnitude maps to +-127
      EXPECT_EQ(q[(r / kPanel * k + 0) * kPanel + r % kPanel], -127);
      EXPECT_EQ(q[(r / kPanel * k + 3) * kPanel + r % kPanel], 127);
    }
  }
  w[5] = std::nanf("");
  std::vector<int8_t> q2(q);
  EXPECT_FALSE(PackInt8(w.data(), n, k, q.data(), scales.data()));
  EXPECT_EQ(q, q2);  // untouched
}

TEST(GemmPackTest, PanelLayoutZeroPadsAndRoundsToBf16) {
  const int64_t n = 18, k = 3;
  std::vector<float> w(n * k);
  for (int64_t i = 0; i < n * k; ++i) w[i] = 1.0f + i * 0.001f;
  std::vector<float> f(PackedElems(n, k), -1.0f);
  std::vector<uint16_t> b(PackedElems(n, k), 0xffff);
  ASSERT_EQ(f.size(), 2u * 16 * 3);
  PackF32(w.data(), n, k, f.data());
  PackBf16(w.data(), n, k, b.data());
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t row = p * 16 + c;
        const size_t at = (p * k + kk) * 16 + c;
        const float want = row < n ? w[row * k + kk] : 0.0f;
        EXPECT_EQ(f[at], want) << row << "," << kk;
        EXPECT_EQ(b[at], row < n ? F32ToBF16(want) : 0) << row << "," << kk;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Types, GemmTest, ::testing::Values(false, true),
                         [](const auto& info) { return std::string(info.param ? "BF16" : "F32"); });

}  // namespace
}  // namespace dmoe::core::gemm
