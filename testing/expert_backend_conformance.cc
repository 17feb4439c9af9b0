#include "testing/expert_backend_conformance.h"

#include <cstring>
#include <limits>
#include <vector>

#include "core/combine.h"
#include "core/status.h"
#include "gmock/gmock.h"
#include "testing/expert_reference.h"
#include "testing/status_matchers.h"

namespace dmoe::testing {

using ::testing::AllOf;
using ::testing::HasSubstr;

ConformanceModel::ConformanceModel() {
  for (int32_t l : kLayers) {
    for (int32_t f = core::kSharedFfn; f < kExperts; ++f) {
      ffns_[{l, f}] = RandomFfn(kHidden, f == core::kSharedFfn ? kSharedInter : kInter,
                                static_cast<uint32_t>(1000 * l + f + 2));
    }
  }
}

std::map<int32_t, HostFfn> ConformanceModel::Layer(int32_t layer) const {
  std::map<int32_t, HostFfn> out;
  for (const auto& [key, f] : ffns_) {
    if (key.first == layer) out[key.second] = f;
  }
  return out;
}

absl::Status ConformanceModel::LoadInto(core::ExpertBackend& b) const {
  for (const auto& [key, f] : ffns_)
    DMOE_RETURN_IF_ERROR(b.LoadFfn(key.first, key.second, f.View()));
  return absl::OkStatus();
}

std::string ConformanceName(const ::testing::TestParamInfo<ConformanceParam>& info) {
  return info.param.name;
}

const ConformanceModel& ExpertBackendConformance::model() {
  static const ConformanceModel* m = new ConformanceModel();
  return *m;
}

void ExpertBackendConformance::SetUp() {
  absl::StatusOr<BackendUnderTest> made = GetParam().make(model());
  if (!made.ok() &&
      (absl::IsUnavailable(made.status()) || absl::IsFailedPrecondition(made.status()))) {
    GTEST_SKIP() << GetParam().name << " cannot run here: " << made.status();
  }
  ASSERT_TRUE(made.ok()) << made.status();
  under_test_ = *std::move(made);
  backend_ = under_test_.backend.get();
  ASSERT_NE(backend_, nullptr);
}

HostBatch ExpertBackendConformance::Batch(int32_t layer, int64_t tokens, uint32_t seed,
                                          bool variable_k) const {
  return RandomBatch({.layer = layer,
                      .hidden = ConformanceModel::kHidden,
                      .num_experts = ConformanceModel::kExperts,
                      .top_k = ConformanceModel::kTopK,
                      .variable_k = variable_k,
                      .shared = SharedFfn::kAlways},
                     tokens, seed);
}

std::vector<float> ExpertBackendConformance::Run(const HostBatch& b) {
  std::vector<float> out(b.tokens() * b.hidden, std::numeric_limits<float>::quiet_NaN());
  const absl::Status st = backend_->Compute(b.View(), out.data());
  EXPECT_THAT(st, IsOk()) << "layer " << b.layer << ", " << b.tokens() << " tokens";
  return out;
}

void ExpertBackendConformance::ExpectNearReference(const HostBatch& b,
                                                   const std::vector<float>& out) const {
  ExpectMatchesReference(b, out, model().Layer(b.layer), GetParam().reference_type,
                         GetParam().extra_rel_error);
}

namespace {

constexpr int64_t kH = ConformanceModel::kHidden;

// Token t of `b` as a batch of one.
HostBatch OneToken(const HostBatch& b, int64_t t) {
  HostBatch one{.layer = b.layer, .hidden = b.hidden};
  one.AddToken(
      std::vector<float>(b.x.begin() + t * b.hidden, b.x.begin() + (t + 1) * b.hidden),
      std::vector<int32_t>(b.ids.begin() + b.offsets[t], b.ids.begin() + b.offsets[t + 1]),
      std::vector<float>(b.weights.begin() + b.offsets[t], b.weights.begin() + b.offsets[t + 1]));
  return one;
}

// Row t of `out`.
std::vector<float> Row(const std::vector<float>& out, int64_t t) {
  return std::vector<float>(out.begin() + t * kH, out.begin() + (t + 1) * kH);
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_P(ExpertBackendConformance, MatchesTheFloat64ReferenceInEveryLayerAndBatchSize) {
  uint32_t seed = 1;
  for (int32_t layer : ConformanceModel::kLayers) {
    for (int64_t tokens : {1, 4, 37}) {
      for (bool variable_k : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "layer " << layer << ", " << tokens << " tokens"
                                          << (variable_k ? ", 0..k experts" : ""));
        const HostBatch b = Batch(layer, tokens, seed++, variable_k);
        ExpectNearReference(b, Run(b));
      }
    }
  }
}

TEST_P(ExpertBackendConformance, TokenResultDoesNotDependOnTheBatch) {
  const HostBatch b = Batch(1, 24, 7, /*variable_k=*/true);
  const std::vector<float> batched = Run(b);
  HostBatch reversed{.layer = b.layer, .hidden = b.hidden};
  for (int64_t t = b.tokens() - 1; t >= 0; --t) {
    const HostBatch one = OneToken(b, t);
    reversed.AddToken(one.x, one.ids, one.weights);
  }
  const std::vector<float> backwards = Run(reversed);
  for (int64_t t : {int64_t{0}, int64_t{5}, int64_t{23}}) {
    SCOPED_TRACE(::testing::Message() << "token " << t);
    const HostBatch one = OneToken(b, t);
    const std::vector<float> alone = Run(one);
    if (GetParam().batch_invariant) {
      EXPECT_TRUE(SameBits(alone, Row(batched, t))) << "alone vs in a batch of 24";
      EXPECT_TRUE(SameBits(alone, Row(backwards, b.tokens() - 1 - t))) << "alone vs reversed";
    } else {
      ExpectNearReference(one, alone);
    }
  }
  ExpectNearReference(b, batched);
}

TEST_P(ExpertBackendConformance, SameBatchGivesTheSameBitsRunToRun) {
  for (int32_t layer : ConformanceModel::kLayers) {
    const HostBatch b = Batch(layer, 19, 11 + layer, /*variable_k=*/true);
    EXPECT_TRUE(SameBits(Run(b), Run(b))) << "layer " << layer;
  }
}

TEST_P(ExpertBackendConformance, TicketsAwaitedInAnyOrderGiveComputesBits) {
  const std::vector<HostBatch> batches = {Batch(1, 3, 21), Batch(2, 9, 22, true), Batch(1, 1, 23)};
  std::vector<std::vector<float>> outs(batches.size());
  std::vector<uint64_t> tickets;
  for (size_t i = 0; i < batches.size(); ++i) {
    outs[i].assign(batches[i].tokens() * kH, std::numeric_limits<float>::quiet_NaN());
    absl::StatusOr<uint64_t> t = backend_->Submit(batches[i].View(), outs[i].data());
    ASSERT_THAT(t.status(), IsOk());
    tickets.push_back(*t);
  }
  for (size_t i : {2, 0, 1}) ASSERT_THAT(backend_->Await(tickets[i]), IsOk()) << "batch " << i;
  for (size_t i = 0; i < batches.size(); ++i) {
    EXPECT_TRUE(SameBits(outs[i], Run(batches[i]))) << "batch " << i;
  }
}

TEST_P(ExpertBackendConformance, CancelledTicketLeavesTheBackendUsable) {
  const HostBatch first = Batch(2, 6, 31);
  std::vector<float> out(first.tokens() * kH);
  absl::StatusOr<uint64_t> t = backend_->Submit(first.View(), out.data());
  ASSERT_THAT(t.status(), IsOk());
  backend_->Cancel(*t);
  const HostBatch next = Batch(2, 5, 32);
  ExpectNearReference(next, Run(next));
}

TEST_P(ExpertBackendConformance, EmptyBatchAndTokensWithoutWork) {
  const HostBatch empty{.layer = 1, .hidden = kH};
  EXPECT_THAT(backend_->Compute(empty.View(), nullptr), IsOk());
  // Tokens 0 and 2 have no assignment: zeros, whatever `out` held.
  const HostBatch work = Batch(2, 1, 41);
  HostBatch b{.layer = 2, .hidden = kH};
  b.AddToken(std::vector<float>(kH, 0.5f), {}, {});
  b.AddToken(work.x, work.ids, work.weights);
  b.AddToken(std::vector<float>(kH, -0.25f), {}, {});
  const std::vector<float> out = Run(b);
  EXPECT_EQ(Row(out, 0), std::vector<float>(kH, 0.0f));
  EXPECT_EQ(Row(out, 2), std::vector<float>(kH, 0.0f));
  ExpectNearReference(b, out);
}

TEST_P(ExpertBackendConformance, PerAssignmentRowsAddUpToComputesBits) {
  HostBatch b = Batch(1, 7, 51, /*variable_k=*/true);
  core::ExpertBatch view = b.View();
  view.per_assignment_out = true;
  std::vector<float> rows(b.ids.size() * kH, std::numeric_limits<float>::quiet_NaN());
  const absl::Status st = backend_->Compute(view, rows.data());
  if (!backend_->SupportsPerAssignmentOut()) {
    EXPECT_THAT(st, StatusIs(absl::StatusCode::kUnimplemented));
    return;
  }
  ASSERT_THAT(st, IsOk());
  std::vector<const float*> row_ptrs(b.ids.size());
  for (size_t a = 0; a < b.ids.size(); ++a) row_ptrs[a] = rows.data() + a * kH;
  std::vector<float> summed(b.tokens() * kH);
  core::SumAssignmentRows(b.offsets, row_ptrs, kH, summed.data());
  EXPECT_TRUE(SameBits(summed, Run(b)));
}

TEST_P(ExpertBackendConformance, MalformedBatchesAreInvalidArgumentAndOutIsUntouched) {
  const HostBatch good = Batch(1, 3, 61);  // offsets {0, 4, 8, 12}
  struct Case {
    const char* what;
    std::function<core::ExpertBatch(HostBatch&)> spoil;  // spoils h, returns its view
  };
  auto with = [](auto change) {
    return [change](HostBatch& h) {
      core::ExpertBatch v = h.View();
      change(v);
      return v;
    };
  };
  auto changed = [](auto change) {
    return [change](HostBatch& h) {
      change(h);
      return h.View();
    };
  };
  const std::vector<Case> cases = {
      {"negative layer", with([](core::ExpertBatch& v) { v.layer = -1; })},
      {"offsets not from 0", changed([](HostBatch& h) { h.offsets[0] = 1; })},
      {"offsets decrease", changed([](HostBatch& h) { h.offsets[2] = 1; })},
      {"offsets end short of the assignments",
       changed([](HostBatch& h) { h.offsets.back() -= 1; })},
      {"a weight missing", changed([](HostBatch& h) { h.weights.pop_back(); })},
      {"FFN id below kSharedFfn", changed([](HostBatch& h) { h.ids[1] = -5; })},
      {"no hidden size", with([](core::ExpertBatch& v) { v.hidden = 0; })},
      {"no activations", with([](core::ExpertBatch& v) { v.x = nullptr; })},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    HostBatch h = good;
    const core::ExpertBatch view = c.spoil(h);
    std::vector<float> out(good.tokens() * kH, 42.0f);
    EXPECT_THAT(backend_->Compute(view, out.data()),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer")));
    EXPECT_EQ(out, std::vector<float>(out.size(), 42.0f));
  }
  // Still serves.
  ExpectNearReference(good, Run(good));
}

TEST_P(ExpertBackendConformance, FfnsItCannotComputeAreFailedPreconditionNamingThem) {
  HostBatch b = Batch(1, 3, 71);
  b.ids[5] = ConformanceModel::kExperts + 3;  // token 1's second routed expert: no such expert
  std::vector<float> out(b.tokens() * kH, 42.0f);
  EXPECT_THAT(backend_->Compute(b.View(), out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("layer 1"), HasSubstr("expert 11"))));
  EXPECT_EQ(out, std::vector<float>(out.size(), 42.0f));
  // Layer 0 is dense: none of its routed experts is anywhere.
  EXPECT_THAT(backend_->Compute(Batch(1, 2, 72).View(/*layer=*/0), out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("layer 0")));
  EXPECT_EQ(out, std::vector<float>(out.size(), 42.0f));
  ExpectNearReference(Batch(2, 4, 73), Run(Batch(2, 4, 73)));
}

}  // namespace dmoe::testing
