// SwiGLU at every level the host has: identical bits, and close to silu in
// float64.
#include "core/kernels/cpu/swiglu.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/isa.h"
#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

// gate values: random over several scales, and the edges of exp's range.
std::vector<float> GateUp(int64_t inter) {
  std::mt19937 rng(3);
  std::vector<float> gu(2 * inter);
  const float scales[] = {1e-3f, 0.5f, 4.0f, 30.0f, 120.0f};
  for (int64_t j = 0; j < inter; ++j) {
    std::uniform_real_distribution<float> d(-1, 1);
    gu[j] = d(rng) * scales[j % 5];
    gu[inter + j] = d(rng);
  }
  const float edges[] = {0.0f,    -0.0f,   87.3f,  88.7f,  -87.3f,  -88.8f, -103.9f,
                         104.0f,  -150.0f, 150.0f, 1e-40f, -1e-40f, -89.5f, -95.0f,
                         -100.5f, 20.0f,   -20.0f, 1e30f,  -1e30f,  -86.9f};
  for (size_t i = 0; i < std::size(edges) && i < static_cast<size_t>(inter); ++i)
    gu[i * 3 % inter] = edges[i];
  return gu;
}

TEST(SwiGlu, LevelsGiveIdenticalBits) {
  for (int64_t inter : {1, 7, 8, 15, 16, 17, 100, 1408}) {
    const std::vector<float> gu = GateUp(inter);
    std::vector<float> generic(inter), avx2(inter), avx512(inter);
    SwiGluRowGeneric(gu.data(), generic.data(), inter);
    if (static_cast<int>(HostIsa()) >= static_cast<int>(IsaLevel::kAvx2)) {
      SwiGluRowAvx2(gu.data(), avx2.data(), inter);
      for (int64_t j = 0; j < inter; ++j) {
        ASSERT_EQ(std::memcmp(&generic[j], &avx2[j], 4), 0)
            << "inter " << inter << " j " << j << " g " << gu[j] << ": " << generic[j] << " vs "
            << avx2[j];
      }
    }
    if (static_cast<int>(HostIsa()) >= static_cast<int>(IsaLevel::kAvx512)) {
      SwiGluRowAvx512(gu.data(), avx512.data(), inter);
      for (int64_t j = 0; j < inter; ++j) {
        ASSERT_EQ(std::memcmp(&generic[j], &avx512[j], 4), 0)
            << "inter " << inter << " j " << j << " g " << gu[j] << ": " << generic[j] << " vs "
            << avx512[j];
      }
    }
  }
}

TEST(SwiGlu, CloseToSiluInFloat64) {
  const int64_t inter = 1408;
  const std::vector<float> gu = GateUp(inter);
  std::vector<float> h(inter);
  SwiGluRow(gu.data(), h.data(), inter);
  for (int64_t j = 0; j < inter; ++j) {
    const double g = gu[j], u = gu[inter + j];
    const double want = g / (1.0 + std::exp(-g)) * u;
    // exp ~1 ulp, then a division and a product: a few ulp of the result.
    // Below g ~ -88.7, exp(-g) overflows fp32 and silu is 0 instead of
    // g e^g (|g e^g| < 1e-35 there).
    const double tol = 4 * std::ldexp(std::fabs(want), -23) + 1e-35;
    EXPECT_NEAR(h[j], want, tol) << "g " << g << " u " << u;
  }
}

}  // namespace
}  // namespace dmoe::core
