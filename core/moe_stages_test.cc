// The dispatch-plan and combine stages of a MoE layer (core/dispatch_plan.h,
// core/combine.h): the assignment order they fix is the order of every
// backend's fp32 sum, so these pin it down exactly.
#include <cmath>
#include <limits>
#include <vector>

#include "core/combine.h"
#include "core/dispatch_plan.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

using ::testing::ElementsAre;

GateResult TwoTokensTopTwo() {
  GateResult r;
  r.num_tokens = 2;
  r.top_k = 2;
  r.experts = {5, 2, 0, 7};
  r.weights = {0.75f, 0.25f, 0.5f, 0.125f};
  return r;
}

TEST(DispatchPlan, RoutedExpertsInGateOrderThenTheSharedFfnWithWeightOne) {
  const DispatchPlan plan = MakeDispatchPlan(TwoTokensTopTwo(), /*with_shared=*/true);
  EXPECT_THAT(plan.token_offsets, ElementsAre(0, 3, 6));
  EXPECT_THAT(plan.ffn_ids, ElementsAre(5, 2, kSharedFfn, 0, 7, kSharedFfn));
  EXPECT_THAT(plan.weights, ElementsAre(0.75f, 0.25f, 1.0f, 0.5f, 0.125f, 1.0f));
}

TEST(DispatchPlan, WithoutSharedExpertsOnlyTheRoutedOnes) {
  const DispatchPlan plan = MakeDispatchPlan(TwoTokensTopTwo(), /*with_shared=*/false);
  EXPECT_THAT(plan.token_offsets, ElementsAre(0, 2, 4));
  EXPECT_THAT(plan.ffn_ids, ElementsAre(5, 2, 0, 7));
  EXPECT_THAT(plan.weights, ElementsAre(0.75f, 0.25f, 0.5f, 0.125f));
}

TEST(DispatchPlan, NoTokensIsOneOffsetAndAValidEmptyBatch) {
  GateResult r;
  r.top_k = 6;
  const DispatchPlan plan = MakeDispatchPlan(r, /*with_shared=*/true);
  EXPECT_THAT(plan.token_offsets, ElementsAre(0));
  EXPECT_TRUE(plan.ffn_ids.empty());
  const ExpertBatch b = plan.AsBatch(3, nullptr, 0, 64);
  EXPECT_TRUE(ValidateExpertBatch(b, nullptr).ok());
}

TEST(DispatchPlan, AsBatchViewsThePlanAndTheActivations) {
  const DispatchPlan plan = MakeDispatchPlan(TwoTokensTopTwo(), /*with_shared=*/true);
  std::vector<float> x(2 * 4, 1.0f), out(2 * 4);
  const ExpertBatch b = plan.AsBatch(7, x.data(), 2, 4);
  EXPECT_EQ(b.layer, 7);
  EXPECT_EQ(b.num_tokens, 2);
  EXPECT_EQ(b.hidden, 4);
  EXPECT_EQ(b.x, x.data());
  EXPECT_EQ(b.token_offsets.data(), plan.token_offsets.data());
  EXPECT_EQ(b.ffn_ids.data(), plan.ffn_ids.data());
  EXPECT_EQ(b.weights.data(), plan.weights.data());
  EXPECT_FALSE(b.per_assignment_out);
  EXPECT_TRUE(ValidateExpertBatch(b, out.data()).ok());
}

TEST(Combine, SumsEachTokensRowsLeftToRightInFp32) {
  // 1 + 1e8 rounds to 1e8 in fp32, so ((1 + 1e8) - 1e8) = 0 while any other
  // grouping, or a wider accumulator, gives 1.
  const std::vector<float> c0 = {1.0f, 2.0f}, c1 = {1e8f, 0.5f}, c2 = {-1e8f, 0.25f};
  const std::vector<int32_t> offsets = {0, 3, 3, 4};
  const std::vector<const float*> rows = {c0.data(), c1.data(), c2.data(), c1.data()};
  std::vector<float> out(3 * 2, std::numeric_limits<float>::quiet_NaN());
  SumAssignmentRows(offsets, rows, 2, out.data());
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], 2.75f);
  // A token without assignments gets zeros, not what `out` held.
  EXPECT_EQ(out[2], 0.0f);
  EXPECT_EQ(out[3], 0.0f);
  // One row is copied as is.
  EXPECT_EQ(out[4], 1e8f);
  EXPECT_EQ(out[5], 0.5f);
}

TEST(Combine, AddToResidualAddsElementwise) {
  std::vector<float> residual = {1.0f, -2.0f, 3.5f};
  const std::vector<float> ffn = {0.5f, 2.0f, -0.25f};
  AddToResidual(residual, ffn);
  EXPECT_THAT(residual, ElementsAre(1.5f, 0.0f, 3.25f));
}

TEST(Combine, CountExpertLoadCountsEveryRoutedAssignment) {
  GateResult r = TwoTokensTopTwo();
  r.experts = {5, 2, 5, 7};
  std::vector<int64_t> load(8, 0);
  load[2] = 10;
  CountExpertLoad(r, load);
  EXPECT_THAT(load, ElementsAre(0, 0, 11, 0, 0, 2, 0, 1));
}

}  // namespace
}  // namespace dmoe::core
