#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "core/dtype.h"
#include "core/expert_backend.h"
#include "core/kernels/cpu/linear.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/expert_backend_conformance.h"
#include "testing/expert_batch.h"
#include "testing/expert_reference.h"
#include "testing/status_matchers.h"

namespace dmoe::core {
namespace {

using testing::ExpectMatchesReference;
using testing::ExpertBackendConformance;
using ::testing::HasSubstr;
using testing::HostBatch;
using testing::HostFfn;
using testing::IsOk;
using testing::RandomFfn;
using testing::StatusIs;
using testing::Uniform;

constexpr int32_t kLayer = 3;

class CpuExpertBackendTest : public ::testing::TestWithParam<ComputeType> {
 protected:
  // Loads `num_experts` routed experts (inter) and a shared FFN (shared_inter).
  void LoadLayer(int64_t hidden, int64_t inter, int64_t shared_inter, int num_experts) {
    hidden_ = hidden;
    backend_ = MakeCpuExpertBackend(GetParam());
    for (int e = 0; e < num_experts; ++e) {
      ffns_[e] = RandomFfn(hidden, inter, 100 + e);
      ASSERT_THAT(backend_->LoadFfn(kLayer, e, ffns_[e].View()), IsOk());
    }
    ffns_[kSharedFfn] = RandomFfn(hidden, shared_inter, 99);
    ASSERT_THAT(backend_->LoadFfn(kLayer, kSharedFfn, ffns_[kSharedFfn].View()), IsOk());
  }

  // Random top-k distinct experts plus the shared FFN for every token.
  HostBatch RandomBatch(int64_t tokens, int top_k, int num_experts, uint32_t seed) {
    return testing::RandomBatch({.layer = kLayer,
                                 .hidden = hidden_,
                                 .num_experts = num_experts,
                                 .top_k = top_k,
                                 .shared = testing::SharedFfn::kAlways},
                                tokens, seed);
  }

  void TearDown() override { SetComputeThreads(0); }

  int64_t hidden_ = 0;
  std::unique_ptr<ExpertBackend> backend_;
  std::map<int32_t, HostFfn> ffns_;
};

TEST_P(CpuExpertBackendTest, MatchesFloat64ReferenceWithSharedFfnAndEmptyTokens) {
  LoadLayer(/*hidden=*/64, /*inter=*/48, /*shared_inter=*/96,
            /*num_experts=*/8);
  std::mt19937 rng(7);
  HostBatch b{.layer = kLayer, .hidden = 64};
  b.AddToken(Uniform(64, 1, &rng), {kSharedFfn, 2, 5}, {1.0f, 0.7f, -0.3f});
  b.AddToken(Uniform(64, 1, &rng), {}, {});                                   // no work: zeros
  b.AddToken(Uniform(64, 1, &rng), {5, 2, kSharedFfn}, {0.25f, 0.5f, 1.0f});  // same experts
  b.AddToken(Uniform(64, 1, &rng), {kSharedFfn}, {1.0f});                     // shared only
  b.AddToken(Uniform(64, 1, &rng), {7}, {2.0f});  // one routed, no shared
  // More assignments than the combine takes per sweep (8), one expert twice.
  b.AddToken(Uniform(64, 1, &rng), {0, 1, 2, 3, 4, 5, 6, 7, kSharedFfn, 3},
             {0.1f, -0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f, 1.0f, -0.9f});
  HostBatch more = RandomBatch(9, 3, 8, 11);
  for (int64_t t = 0; t < more.tokens(); ++t) {
    b.AddToken(std::vector<float>(more.x.begin() + t * 64, more.x.begin() + (t + 1) * 64),
               std::vector<int32_t>(more.ids.begin() + more.offsets[t],
                                    more.ids.begin() + more.offsets[t + 1]),
               std::vector<float>(more.weights.begin() + more.offsets[t],
                                  more.weights.begin() + more.offsets[t + 1]));
  }
  std::vector<float> out(b.tokens() * 64, std::nanf(""));
  ASSERT_THAT(backend_->Compute(b.View(), out.data()), IsOk());
  ExpectMatchesReference(b, out, ffns_, GetParam());
  for (int j = 0; j < 64; ++j) EXPECT_EQ(out[1 * 64 + j], 0.0f) << j;
}

TEST_P(CpuExpertBackendTest, OddShapes) {
  LoadLayer(/*hidden=*/37, /*inter=*/19, /*shared_inter=*/23,
            /*num_experts=*/3);
  HostBatch b = RandomBatch(5, 2, 3, 5);
  std::vector<float> out(b.tokens() * 37);
  ASSERT_THAT(backend_->Compute(b.View(), out.data()), IsOk());
  ExpectMatchesReference(b, out, ffns_, GetParam());
}

// 600 tokens: the shared FFN's 600 rows are split into row chunks, and with two
// threads whole chunks/experts run concurrently; with one they run in sequence.
TEST_P(CpuExpertBackendTest, TokenResultIsBitwiseTheSameAloneOrBatchedAndAcrossThreads) {
  const int64_t hidden = 128, inter = 96;
  LoadLayer(hidden, inter, 2 * inter, /*num_experts=*/16);
  const HostBatch b = RandomBatch(600, 4, 16, 21);
  SetComputeThreads(2);
  std::vector<float> batched(b.tokens() * hidden);
  ASSERT_THAT(backend_->Compute(b.View(), batched.data()), IsOk());
  ExpectMatchesReference(b, batched, ffns_, GetParam());

  for (int threads : {1, 2}) {
    SetComputeThreads(threads);
    std::vector<float> again(batched.size());
    ASSERT_THAT(backend_->Compute(b.View(), again.data()), IsOk());
    EXPECT_EQ(0, std::memcmp(again.data(), batched.data(), again.size() * sizeof(float)))
        << "threads " << threads;
    for (int64_t t : {0, 1, 77, 599}) {
      HostBatch alone{.layer = kLayer, .hidden = hidden};
      alone.AddToken(
          std::vector<float>(b.x.begin() + t * hidden, b.x.begin() + (t + 1) * hidden),
          std::vector<int32_t>(b.ids.begin() + b.offsets[t], b.ids.begin() + b.offsets[t + 1]),
          std::vector<float>(b.weights.begin() + b.offsets[t],
                             b.weights.begin() + b.offsets[t + 1]));
      std::vector<float> one(hidden);
      ASSERT_THAT(backend_->Compute(alone.View(), one.data()), IsOk());
      EXPECT_EQ(0, std::memcmp(one.data(), batched.data() + t * hidden, hidden * sizeof(float)))
          << "token " << t << " threads " << threads;
    }
  }
}

TEST_P(CpuExpertBackendTest, UnloadedExpertIsAnErrorAndOutIsUntouched) {
  LoadLayer(64, 48, 96, 4);
  HostBatch b = RandomBatch(3, 2, 4, 3);
  b.ids[4] = 7;  // token 1's second routed expert: never loaded
  std::vector<float> out(b.tokens() * 64, 42.0f);
  absl::Status s = backend_->Compute(b.View(), out.data());
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition,
                          HasSubstr("layer 3: expert 7 is not loaded on this backend")));
  for (float f : out) ASSERT_EQ(f, 42.0f);

  s = backend_->Compute(RandomBatch(2, 2, 4, 4).View(/*layer=*/4), out.data());
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("layer 4: expert")));
  EXPECT_THAT(s.message(), HasSubstr("is not loaded on this backend"));

  ASSERT_THAT(backend_->UnloadFfn(kLayer, kSharedFfn), IsOk());
  s = backend_->Compute(RandomBatch(2, 2, 4, 4).View(), out.data());
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition,
                          HasSubstr("layer 3: shared FFN is not loaded on this backend")));

  HostBatch bad_id = RandomBatch(1, 1, 4, 5);
  bad_id.ids[0] = -5;
  s = backend_->Compute(bad_id.View(), out.data());
  EXPECT_THAT(
      s, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 3: invalid FFN id -5")));
}

TEST_P(CpuExpertBackendTest, InconsistentOffsetsAndSizesAreErrors) {
  LoadLayer(64, 48, 96, 4);
  const HostBatch good = RandomBatch(3, 2, 4, 3);  // offsets {0, 3, 6, 9}
  std::vector<float> out(3 * 64, 42.0f);
  struct Case {
    const char* name;
    std::function<void(HostBatch&, ExpertBatch&)> mutate;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"offsets too short", [](HostBatch&, ExpertBatch& e) { e.num_tokens = 4; },
       "layer 3: token_offsets has 4 entries, expected num_tokens + 1 = 5"},
      {"first offset", [](HostBatch& h, ExpertBatch&) { h.offsets[0] = 1; },
       "layer 3: token_offsets[0] is 1, expected 0"},
      {"decreasing", [](HostBatch& h, ExpertBatch&) { h.offsets[2] = 2; },
       "layer 3: token_offsets decrease at token 1 (3 -> 2)"},
      {"end", [](HostBatch& h, ExpertBatch&) { h.offsets[3] = 8; },
       "layer 3: token_offsets end at 8 but there are 9 assignments"},
      {"weights", [](HostBatch& h, ExpertBatch&) { h.weights.pop_back(); },
       "layer 3: 8 weights for 9 assignments"},
      {"hidden", [](HostBatch&, ExpertBatch& e) { e.hidden = 32; }, "hidden 64 != batch hidden 32"},
      {"negative tokens", [](HostBatch&, ExpertBatch& e) { e.num_tokens = -1; },
       "num_tokens -1 is negative"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    HostBatch h = good;
    ExpertBatch e = h.View();
    c.mutate(h, e);
    e.token_offsets = h.offsets;
    e.weights = h.weights;
    const absl::Status s = backend_->Compute(e, out.data());
    EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.message)));
    for (float f : out) ASSERT_EQ(f, 42.0f);
  }
  // The hidden mismatch names the expert.
  ExpertBatch e = good.View();
  e.hidden = 32;
  EXPECT_THAT(std::string(backend_->Compute(e, out.data()).message()),
              ::testing::MatchesRegex("layer 3 (expert [0-9]+|shared FFN): hidden 64 != batch "
                                      "hidden 32"));
}

TEST_P(CpuExpertBackendTest, UnloadThenComputeIsAnError) {
  LoadLayer(64, 48, 96, 4);
  const size_t before = backend_->WeightBytes();
  ASSERT_TRUE(backend_->HasFfn(kLayer, 2));
  ASSERT_THAT(backend_->UnloadFfn(kLayer, 2), IsOk());
  EXPECT_FALSE(backend_->HasFfn(kLayer, 2));
  EXPECT_TRUE(backend_->HasFfn(kLayer, 1));
  EXPECT_LT(backend_->WeightBytes(), before);
  HostBatch b{.layer = kLayer, .hidden = 64};
  b.AddToken(std::vector<float>(64, 0.5f), {1, 2}, {0.5f, 0.5f});
  std::vector<float> out(64);
  const absl::Status s = backend_->Compute(b.View(), out.data());
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition,
                          HasSubstr("layer 3: expert 2 is not loaded on this backend")));

  const absl::Status again = backend_->UnloadFfn(kLayer, 2);
  EXPECT_THAT(again,
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("layer 3 expert 2 is not loaded")));
  for (int e : {0, 1, 3}) ASSERT_THAT(backend_->UnloadFfn(kLayer, e), IsOk());
  ASSERT_THAT(backend_->UnloadFfn(kLayer, kSharedFfn), IsOk());
  EXPECT_EQ(backend_->WeightBytes(), 0u);
}

TEST_P(CpuExpertBackendTest, LoadRejectsBadShapesAndReloadReplaces) {
  LoadLayer(64, 48, 96, 2);
  HostFfn bad = RandomFfn(64, 48, 1);
  bad.gate.pop_back();
  absl::Status s = backend_->LoadFfn(kLayer, 5, bad.View());
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument,
                          HasSubstr("layer 3 expert 5: gate_proj has 3071 elements, "
                                    "expected [48,64]")));
  EXPECT_FALSE(backend_->HasFfn(kLayer, 5));
  FfnWeights zero = RandomFfn(64, 48, 1).View();
  zero.intermediate = 0;
  EXPECT_THAT(backend_->LoadFfn(kLayer, 5, zero), StatusIs(absl::StatusCode::kInvalidArgument));

  const size_t bytes = backend_->WeightBytes();
  ffns_[1] = RandomFfn(64, 48, 555);
  ASSERT_THAT(backend_->LoadFfn(kLayer, 1, ffns_[1].View()), IsOk());
  EXPECT_EQ(backend_->WeightBytes(), bytes);
  HostBatch b = RandomBatch(4, 2, 2, 8);
  std::vector<float> out(4 * 64);
  ASSERT_THAT(backend_->Compute(b.View(), out.data()), IsOk());
  ExpectMatchesReference(b, out, ffns_, GetParam());
}

TEST_P(CpuExpertBackendTest, EmptyBatchAndWeightBytesAndName) {
  LoadLayer(64, 48, 96, 2);
  HostBatch empty{.layer = kLayer, .hidden = 64};
  EXPECT_THAT(backend_->Compute(empty.View(), nullptr), IsOk());
  const bool bf16 = GetParam() == ComputeType::kBF16, int8 = GetParam() == ComputeType::kInt8;
  const size_t elem = bf16 ? 2 : int8 ? 1 : 4;
  EXPECT_GE(backend_->WeightBytes(), (2 * 3 * 64 * 48 + 3 * 64 * 96) * elem);
  EXPECT_LE(backend_->WeightBytes(), 2 * (2 * 3 * 64 * 48 + 3 * 64 * 96) * elem);
  EXPECT_EQ(backend_->Name(), bf16 ? "cpu-bf16" : int8 ? "cpu-int8" : "cpu-f32");
}

INSTANTIATE_TEST_SUITE_P(Types, CpuExpertBackendTest,
                         ::testing::Values(ComputeType::kF32, ComputeType::kBF16,
                                           ComputeType::kInt8),
                         [](const auto& info) {
                           return info.param == ComputeType::kBF16   ? "BF16"
                                  : info.param == ComputeType::kInt8 ? "INT8"
                                                                     : "F32";
                         });

// ---- the conformance suite every ExpertBackend runs ----------------------------

testing::ConformanceParam CpuConformance(ComputeType type) {
  return {
      .name = type == ComputeType::kF32    ? "F32"
              : type == ComputeType::kBF16 ? "BF16"
                                           : "INT8",
      .make =
          [type](const testing::ConformanceModel& m) -> absl::StatusOr<testing::BackendUnderTest> {
        testing::BackendUnderTest out;
        out.backend = MakeCpuExpertBackend(type);
        const absl::Status st = m.LoadInto(*out.backend);
        if (!st.ok()) return st;
        return out;
      },
      .reference_type = type};
}

INSTANTIATE_TEST_SUITE_P(Cpu, ExpertBackendConformance,
                         ::testing::Values(CpuConformance(ComputeType::kF32),
                                           CpuConformance(ComputeType::kBF16),
                                           CpuConformance(ComputeType::kInt8)),
                         testing::ConformanceName);

}  // namespace
}  // namespace dmoe::core
