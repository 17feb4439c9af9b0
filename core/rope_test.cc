#include "core/rope.h"

#include <cmath>
#include <numbers>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

ModelConfig YarnConfig() {
  ModelConfig c;
  c.model_type = ModelType::kDeepseekV2;
  c.rope_theta = 10000;
  c.qk_rope_head_dim = 64;
  c.rope_scaling.type = RopeScalingType::kYarn;
  c.rope_scaling.factor = 40;
  c.rope_scaling.original_max_position_embeddings = 4096;
  c.rope_scaling.beta_fast = 32;
  c.rope_scaling.beta_slow = 1;
  c.rope_scaling.mscale = 0.707;
  c.rope_scaling.mscale_all_dim = 0.707;
  return c;
}

TEST(Rope, PlainFrequencies) {
  ModelConfig c;
  c.rope_theta = 10000;
  std::vector<double> inv = RopeInvFreq(c, 8);
  ASSERT_EQ(inv.size(), 4u);
  for (int j = 0; j < 4; ++j) EXPECT_DOUBLE_EQ(inv[j], std::pow(10000.0, -2.0 * j / 8));
}

TEST(Rope, YarnRampAtV2LiteShapes) {
  // d = 64, L = 4096, theta = 1e4: dim(32) = 64 ln(4096 / (64 pi)) / (2 ln 1e4)
  // = 10.2 -> lo 10; dim(1) = 64 ln(4096 / (2 pi)) / (2 ln 1e4) = 22.5 -> hi 23.
  ModelConfig c = YarnConfig();
  const double d = 64, L = 4096, th = 10000;
  const double lo = std::floor(d * std::log(L / (32 * 2 * std::numbers::pi)) / (2 * std::log(th)));
  const double hi = std::ceil(d * std::log(L / (1 * 2 * std::numbers::pi)) / (2 * std::log(th)));
  ASSERT_EQ(lo, 10);
  ASSERT_EQ(hi, 23);
  std::vector<double> inv = RopeInvFreq(c, 64);
  for (int j = 0; j < 32; ++j) {
    const double f = std::pow(th, -2.0 * j / d);
    const double ramp = std::clamp((j - lo) / (hi - lo), 0.0, 1.0);
    EXPECT_NEAR(inv[j], f / 40 * ramp + f * (1 - ramp), 1e-15) << j;
  }
  EXPECT_DOUBLE_EQ(inv[0], 1.0);                               // fast dims keep their frequency
  EXPECT_NEAR(inv[31], std::pow(th, -62.0 / 64) / 40, 1e-18);  // slow dims are interpolated
}

TEST(Rope, YarnCosSinScaleIsOneWhenMscalesEqual) {
  ModelConfig c = YarnConfig();
  EXPECT_DOUBLE_EQ(RopeCosSinScale(c), 1.0);
  c.rope_scaling.mscale = 1.0;
  c.rope_scaling.mscale_all_dim = 0.0;
  EXPECT_NEAR(RopeCosSinScale(c), 0.1 * std::log(40.0) + 1.0, 1e-12);
}

TEST(Rope, InterleavedRotatesPairs) {
  ModelConfig c;
  c.rope_theta = 10000;
  RopeTable t(c, 4, RopePairing::kInterleaved);
  t.Reserve(8);
  std::vector<float> x = {1, 2, 3, 4};
  t.Apply(x.data(), 5);
  const double a0 = 5.0, a1 = 5.0 * std::pow(10000.0, -0.5);
  EXPECT_NEAR(x[0], 1 * std::cos(a0) - 2 * std::sin(a0), 1e-6);
  EXPECT_NEAR(x[1], 2 * std::cos(a0) + 1 * std::sin(a0), 1e-6);
  EXPECT_NEAR(x[2], 3 * std::cos(a1) - 4 * std::sin(a1), 1e-6);
  EXPECT_NEAR(x[3], 4 * std::cos(a1) + 3 * std::sin(a1), 1e-6);
}

TEST(Rope, HalvesRotateLlamaStyle) {
  ModelConfig c;
  c.rope_theta = 10000;
  RopeTable t(c, 4, RopePairing::kHalves);
  t.Reserve(1000);
  std::vector<float> x = {1, 2, 3, 4};
  t.Apply(x.data(), 700);
  const double a0 = 700.0, a1 = 700.0 * std::pow(10000.0, -0.5);
  EXPECT_NEAR(x[0], 1 * std::cos(a0) - 3 * std::sin(a0), 1e-5);
  EXPECT_NEAR(x[2], 3 * std::cos(a0) + 1 * std::sin(a0), 1e-5);
  EXPECT_NEAR(x[1], 2 * std::cos(a1) - 4 * std::sin(a1), 1e-5);
  EXPECT_NEAR(x[3], 4 * std::cos(a1) + 2 * std::sin(a1), 1e-5);
}

TEST(Rope, LinearScalingDividesPositions) {
  ModelConfig c;
  c.rope_theta = 10000;
  c.rope_scaling.type = RopeScalingType::kLinear;
  c.rope_scaling.factor = 4;
  RopeTable t(c, 2, RopePairing::kInterleaved);
  t.Reserve(16);
  std::vector<float> x = {1, 0};
  t.Apply(x.data(), 8);
  EXPECT_NEAR(x[0], std::cos(2.0), 1e-6);
  EXPECT_NEAR(x[1], std::sin(2.0), 1e-6);
}

}  // namespace
}  // namespace dmoe::core
