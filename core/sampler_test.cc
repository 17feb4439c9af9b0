#include "core/sampler.h"

#include <map>

#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

TEST(Sampler, GreedyPicksArgmaxLowestOnTies) {
  Sampler s({});
  std::vector<float> l = {0.1f, 3.0f, 3.0f, -1.0f};
  EXPECT_EQ(s.Sample(l), 1);
}

TEST(Sampler, SameSeedSameTokens) {
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 42;
  std::vector<float> l = {0.0f, 0.5f, 1.0f, 0.2f, 0.9f};
  Sampler a(p), b(p);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(a.Sample(l), b.Sample(l));
}

TEST(Sampler, TopKRestrictsToLargest) {
  SamplingParams p;
  p.temperature = 5.0;
  p.top_k = 2;
  p.seed = 7;
  Sampler s(p);
  std::vector<float> l = {0.0f, 2.0f, 1.9f, 0.1f};
  for (int i = 0; i < 200; ++i) {
    const int t = s.Sample(l);
    EXPECT_TRUE(t == 1 || t == 2) << t;
  }
}

TEST(Sampler, TopPKeepsSmallestSetReachingMass) {
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.5;
  p.seed = 3;
  Sampler s(p);
  // probabilities ~ {0.64, 0.24, 0.09, 0.03}: top_p 0.5 keeps only the first.
  std::vector<float> l = {3.0f, 2.0f, 1.0f, 0.0f};
  for (int i = 0; i < 100; ++i) EXPECT_EQ(s.Sample(l), 0);
}

TEST(Sampler, TemperatureFollowsDistribution) {
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 11;
  Sampler s(p);
  std::vector<float> l = {0.0f, std::log(3.0f)};  // p = {0.25, 0.75}
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ones += s.Sample(l);
  EXPECT_NEAR(ones / static_cast<double>(n), 0.75, 0.02);
}

TEST(Sampler, ValidateNamesParameter) {
  SamplingParams p;
  p.top_p = 0;
  EXPECT_NE(p.Validate().message().find("top_p"), std::string::npos);
  p = {};
  p.temperature = -1;
  EXPECT_NE(p.Validate().message().find("temperature"), std::string::npos);
  p = {};
  p.top_k = -2;
  EXPECT_EQ(p.Validate().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dmoe::core
