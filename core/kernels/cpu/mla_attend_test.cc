// MlaAttendToken (mla_attend.h) against a float64 reference, and bitwise: with
// and without threads, for a cache with more rows than it attends to, at any
// address, and per head against the same head computed in a smaller group.
#include "core/kernels/cpu/mla_attend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

// ctx[h, :] in float64, straight from the definition.
std::vector<double> Reference(const MlaAttendShape& s, const float* q, const float* cache,
                              int64_t len) {
  std::vector<double> ctx(s.heads * s.rank, 0.0);
  std::vector<double> p(len);
  for (int64_t h = 0; h < s.heads; ++h) {
    double mx = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      double d = 0;
      for (int64_t i = 0; i < s.width; ++i)
        d += double{q[h * s.width + i]} * cache[j * s.width + i];
      p[j] = d * s.scale;
      mx = std::max(mx, p[j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < len; ++j) sum += (p[j] = std::exp(p[j] - mx));
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t c = 0; c < s.rank; ++c) {
        ctx[h * s.rank + c] += p[j] / sum * cache[j * s.width + c];
      }
    }
  }
  return ctx;
}

// A contiguous cache as one block.
void Attend(const MlaAttendShape& s, const float* q, const float* cache, int64_t len, float* ctx,
            int64_t ldctx, bool parallel) {
  const float* one[1] = {cache};
  MlaAttendToken(s, q, one, len, len, ctx, ldctx, parallel);
}

// The same cache scattered into blocks of `block` rows, in shuffled order in
// one pool, with garbage in the unused rows of the last block.
struct Blocked {
  std::vector<float> pool;
  std::vector<const float*> ptrs;
};
Blocked Scatter(const std::vector<float>& cache, int64_t width, int64_t len, int64_t block,
                uint32_t seed) {
  const int64_t n = (len + block - 1) / block;
  std::vector<int64_t> slot(n);
  for (int64_t i = 0; i < n; ++i) slot[i] = i;
  std::shuffle(slot.begin(), slot.end(), std::mt19937(seed));
  Blocked b;
  b.pool.assign(n * block * width + 1, 1e30f);
  for (int64_t j = 0; j < len; ++j) {
    std::copy(cache.begin() + j * width, cache.begin() + (j + 1) * width,
              b.pool.begin() + 1 + (slot[j / block] * block + j % block) * width);
  }
  for (int64_t i = 0; i < n; ++i) b.ptrs.push_back(b.pool.data() + 1 + slot[i] * block * width);
  return b;
}

struct Case {
  int64_t heads, rank, rope, len;
};

class MlaAttendTest : public ::testing::TestWithParam<Case> {};

TEST_P(MlaAttendTest, MatchesFloat64Reference) {
  const Case c = GetParam();
  const MlaAttendShape s{.heads = c.heads,
                         .rank = c.rank,
                         .width = c.rank + c.rope,
                         .scale = 1.0f / std::sqrt(static_cast<float>(c.rank))};
  const auto q = Random(s.heads * s.width, 1);
  const auto cache = Random(c.len * s.width, 2);
  const std::vector<double> ref = Reference(s, q.data(), cache.data(), c.len);
  for (bool parallel : {false, true}) {
    SCOPED_TRACE(parallel ? "parallel" : "one thread");
    std::vector<float> ctx(s.heads * s.rank, NAN);
    Attend(s, q.data(), cache.data(), c.len, ctx.data(), s.rank, parallel);
    int bad = 0;
    for (size_t i = 0; i < ctx.size() && bad < 5; ++i) {
      // A convex combination of N(0,1) values: absolute error of a few f32 ulps
      // of the largest terms, plus the scores' rounding through exp.
      if (!(std::fabs(ctx[i] - ref[i]) <= 2e-5 * (1 + std::fabs(ref[i])))) {
        ADD_FAILURE() << "ctx[" << i << "] = " << ctx[i] << ", expected " << ref[i];
        ++bad;
      }
    }
  }
}

TEST_P(MlaAttendTest, BitsDoNotDependOnThreadsRowsBeyondLenOrAddress) {
  const Case c = GetParam();
  const MlaAttendShape s{
      .heads = c.heads, .rank = c.rank, .width = c.rank + c.rope, .scale = 0.125f};
  const auto q = Random(s.heads * s.width, 3);
  // The cache of a longer sequence: rows past len must not matter.
  auto cache = Random((c.len + 9) * s.width, 4);
  const int64_t ld = s.rank + 5;  // canaries after every context row
  std::vector<float> want(s.heads * ld, -3.0f);
  Attend(s, q.data(), cache.data(), c.len, want.data(), ld, /*parallel=*/false);
  for (int64_t h = 0; h < s.heads; ++h) {
    for (int64_t i = s.rank; i < ld; ++i) ASSERT_EQ(want[h * ld + i], -3.0f) << "wrote past rank";
  }
  std::vector<float> got(s.heads * ld, -3.0f);
  Attend(s, q.data(), cache.data(), c.len, got.data(), ld, /*parallel=*/true);
  EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float))) << "threads";

  std::vector<float> moved(cache.size() + 3);
  std::copy(cache.begin(), cache.end(), moved.begin() + 3);  // another alignment
  for (size_t i = c.len * s.width; i < cache.size(); ++i) moved[3 + i] = 1e30f;
  std::fill(got.begin(), got.end(), -3.0f);
  Attend(s, q.data(), moved.data() + 3, c.len, got.data(), ld, /*parallel=*/true);
  EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)))
      << "another address, different rows past len";

  // One head alone gives that head's bits.
  const MlaAttendShape one{.heads = 1, .rank = s.rank, .width = s.width, .scale = s.scale};
  for (int64_t h : {int64_t{0}, s.heads - 1}) {
    std::vector<float> single(s.rank);
    Attend(one, q.data() + h * s.width, cache.data(), c.len, single.data(), s.rank, false);
    EXPECT_EQ(0, std::memcmp(single.data(), want.data() + h * ld, s.rank * sizeof(float)))
        << "head " << h << " alone";
  }
}

// The cache in blocks of any size, anywhere in memory, gives the bits of the
// contiguous cache: the scores are per row and the context's chains continue
// from block to block.
TEST_P(MlaAttendTest, BitsDoNotDependOnTheBlockSizeOrWhereBlocksLie) {
  const Case c = GetParam();
  const MlaAttendShape s{
      .heads = c.heads, .rank = c.rank, .width = c.rank + c.rope, .scale = 0.125f};
  const auto q = Random(s.heads * s.width, 5);
  const auto cache = Random(c.len * s.width, 6);
  std::vector<float> want(s.heads * s.rank);
  Attend(s, q.data(), cache.data(), c.len, want.data(), s.rank, false);
  for (int64_t block : {1, 3, 16, 64}) {
    const Blocked b = Scatter(cache, s.width, c.len, block, static_cast<uint32_t>(block));
    for (bool parallel : {false, true}) {
      std::vector<float> got(s.heads * s.rank, -1.0f);
      MlaAttendToken(s, q.data(), b.ptrs, block, c.len, got.data(), s.rank, parallel);
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)))
          << "blocks of " << block << (parallel ? ", threads" : ", one thread");
    }
  }
}

// A score so large that exp of the others underflows: the softmax is one-hot
// and the context is exactly that row; no NaN from the max subtraction.
TEST(MlaAttendEdgeTest, DominantScoreSelectsItsRow) {
  const MlaAttendShape s{.heads = 2, .rank = 16, .width = 24, .scale = 1.0f};
  std::vector<float> q(s.heads * s.width, 0.0f), cache(5 * s.width, 0.0f);
  for (int64_t j = 0; j < 5; ++j) {
    for (int64_t i = 0; i < s.width; ++i) cache[j * s.width + i] = static_cast<float>(j + 1);
  }
  q[0] = 100.0f;             // head 0 prefers the largest row (j = 4)
  q[s.width + 0] = -100.0f;  // head 1 the smallest (j = 0)
  std::vector<float> ctx(s.heads * s.rank);
  Attend(s, q.data(), cache.data(), 5, ctx.data(), s.rank, true);
  for (int64_t i = 0; i < s.rank; ++i) {
    EXPECT_EQ(ctx[i], 5.0f) << i;
    EXPECT_EQ(ctx[s.rank + i], 1.0f) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, MlaAttendTest,
                         ::testing::Values(Case{16, 32, 8, 1}, Case{16, 32, 8, 5},
                                           Case{3, 40, 8, 23},     // a partial c_kv panel
                                           Case{17, 512, 64, 70},  // V2-Lite's row
                                           Case{16, 32, 8, 300}),
                         [](const auto& info) {
                           const Case& c = info.param;
                           return absl::StrFormat("h%d_r%d_p%d_len%d", c.heads, c.rank, c.rope,
                                                  c.len);
                         });

}  // namespace
}  // namespace dmoe::core
