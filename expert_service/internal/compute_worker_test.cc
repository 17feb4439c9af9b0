// ComputeWorker without gRPC: batching across sinks, per-request validation,
// barriers, bounded queue.
#include "expert_service/internal/compute_worker.h"

#include <map>
#include <random>

#include "absl/synchronization/notification.h"
#include "common/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::expert::internal {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr int64_t kHidden = 16;
constexpr int64_t kInter = 8;

// Delegates to the CPU backend and records the token count of every Compute.
class CountingBackend final : public core::ExpertBackend {
 public:
  CountingBackend() : inner_(core::MakeCpuExpertBackend(core::ComputeType::kF32)) {}
  std::string Name() const override { return "counting"; }
  absl::Status LoadFfn(int32_t layer, int32_t id, const core::FfnWeights& w) override {
    return inner_->LoadFfn(layer, id, w);
  }
  absl::Status UnloadFfn(int32_t layer, int32_t id) override {
    return inner_->UnloadFfn(layer, id);
  }
  bool HasFfn(int32_t layer, int32_t id) const override { return inner_->HasFfn(layer, id); }
  absl::Status Compute(const core::ExpertBatch& b, float* out) override {
    calls.push_back(b.num_tokens);
    return inner_->Compute(b, out);
  }
  size_t WeightBytes() const override { return inner_->WeightBytes(); }
  bool SupportsPerAssignmentOut() const override {
    return per_assignment_out && inner_->SupportsPerAssignmentOut();
  }
  std::vector<int64_t> calls;      // worker thread only; read after it is idle
  bool per_assignment_out = true;  // else the worker expands the batch

 private:
  std::unique_ptr<core::ExpertBackend> inner_;
};

// Collects replies; counts Done calls.
class Sink final : public ReplySink {
 public:
  v1::ExpertResponse* NewResponse() override { return new v1::ExpertResponse(); }
  void Send(v1::ExpertResponse* r) override {
    absl::MutexLock lock(&mu);
    replies[r->request_id()].push_back(*r);
    delete r;
  }
  void Done(std::vector<std::unique_ptr<v1::ExpertRequest>>) override {
    absl::MutexLock lock(&mu);
    ++done;
  }
  absl::Mutex mu;
  std::map<uint64_t, std::vector<v1::ExpertResponse>> replies;
  int done = 0;
};

class ComputeWorkerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_.hidden_size = kHidden;
    cfg_.num_hidden_layers = 3;
    cfg_.first_k_dense_replace = 1;
    cfg_.n_routed_experts = 4;
    cfg_.n_shared_experts = 1;
    cfg_.moe_intermediate_size = kInter;
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0, 0.3f);
    std::vector<float> w(kHidden * kInter);
    LayerSlots slots(3);
    for (int32_t l = 1; l < 3; ++l) {
      for (int32_t e = -1; e < 2; ++e) {  // experts 0, 1 and the shared FFN
        for (float& v : w) v = normal(rng);
        core::FfnWeights f{kHidden, kInter, w, w, w};
        ASSERT_TRUE(backend_.LoadFfn(l, e, f).ok());
        if (e >= 0) slots[l].push_back(e);
      }
    }
    slots_ = *SlotTable::Create(cfg_, 0, 1, slots);
  }

  void StartWorker(size_t max_queue = 16) {
    worker_ = std::make_unique<ComputeWorker>(cfg_, backend_, backend_mu_, *slots_,
                                              ComputeWorkerOptions{max_queue, 8192});
  }

  WorkItem Item(Sink& sink, uint64_t id, uint32_t layer, uint32_t tokens, int32_t expert = 0) {
    auto r = std::make_unique<v1::ExpertRequest>();
    r->set_request_id(id);
    r->set_layer(layer);
    r->set_placement_version(1);
    std::vector<float> x(tokens * kHidden, 0.5f);
    r->mutable_x()->set_dtype(v1::ACTIVATION_DTYPE_F32);
    r->mutable_x()->set_rows(tokens);
    r->mutable_x()->set_cols(kHidden);
    std::string scales;
    common::PackActivations(x.data(), tokens, kHidden, 0, common::WireDType::kF32,
                            r->mutable_x()->mutable_data(), &scales);
    r->add_token_offsets(0);
    for (uint32_t t = 0; t < tokens; ++t) {
      r->add_expert_ids(expert);
      r->add_weights(1.0f);
      r->add_token_offsets(t + 1);
    }
    WorkItem item;
    item.sink = &sink;
    item.chunks.push_back(std::move(r));
    return item;
  }

  void WaitIdle() {
    absl::Notification n;
    worker_->RunAfterQueued([&] { n.Notify(); });
    n.WaitForNotification();
  }

  core::ModelConfig cfg_;
  CountingBackend backend_;
  absl::Mutex backend_mu_;
  std::unique_ptr<SlotTable> slots_;
  std::unique_ptr<ComputeWorker> worker_;
};

TEST_F(ComputeWorkerTest, SameLayerRequestsFromTwoSinksShareOneCompute) {
  StartWorker();
  Sink a, b;
  {
    // Hold the backend so that the first request blocks the worker while the
    // others queue up behind it.
    absl::MutexLock hold(&backend_mu_);
    WorkItem first = Item(a, 1, 1, 2);
    ASSERT_TRUE(worker_->TryEnqueue(first));
    while (worker_->queued() != 0) absl::SleepFor(absl::Milliseconds(1));
    WorkItem b1 = Item(b, 2, 1, 3), a2 = Item(a, 3, 2, 5), b3 = Item(b, 4, 1, 4);
    ASSERT_TRUE(worker_->TryEnqueue(b1));
    ASSERT_TRUE(worker_->TryEnqueue(a2));
    ASSERT_TRUE(worker_->TryEnqueue(b3));
  }
  WaitIdle();
  // The blocked request alone, then layer 1's two queued requests together,
  // then layer 2.
  EXPECT_THAT(backend_.calls, ElementsAre(2, 7, 5));
  EXPECT_EQ(a.done + b.done, 4);
  EXPECT_EQ(b.replies[2][0].y().rows(), 3u);
  EXPECT_EQ(b.replies[4][0].y().rows(), 4u);
  // Same input rows, same expert: the batched rows equal the lone ones.
  EXPECT_EQ(b.replies[4][0].y().data().substr(0, kHidden * 4),
            a.replies[1][0].y().data().substr(0, kHidden * 4));
}

// A request for per-assignment rows (weight * FFN(x), experts then the shared
// FFN) batched with one for per-token sums of the same tokens: the sums are
// the rows added in order, bit for bit, whether the backend makes the rows
// itself or the worker gives every assignment its own token.
TEST_F(ComputeWorkerTest, PerAssignmentRowsAddUpToThePerTokenReplyBitwise) {
  for (bool native : {true, false}) {
    SCOPED_TRACE(native ? "backend rows" : "expanded batch");
    backend_.per_assignment_out = native;
    backend_.calls.clear();
    StartWorker();
    Sink s;
    constexpr uint32_t kTokens = 3;
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-1, 1);
    auto make = [&](uint64_t id, bool per_assignment) {
      WorkItem it = Item(s, id, 1, kTokens);
      v1::ExpertRequest& r = *it.chunks[0];
      std::mt19937 same(9);  // both requests: the same x and weights
      std::vector<float> x(kTokens * kHidden);
      for (float& v : x) v = u(same);
      std::string scales;
      common::PackActivations(x.data(), kTokens, kHidden, 0, common::WireDType::kF32,
                              r.mutable_x()->mutable_data(), &scales);
      r.clear_token_offsets();
      r.clear_expert_ids();
      r.clear_weights();
      r.add_token_offsets(0);
      for (uint32_t t = 0; t < kTokens; ++t) {
        r.add_expert_ids(1);
        r.add_weights(u(same));
        r.add_expert_ids(0);
        r.add_weights(u(same));
        r.add_token_offsets(2 * (t + 1));
        r.add_shared_duty(t != 1);  // token 1: experts only
      }
      r.set_per_assignment_reply(per_assignment);
      return it;
    };
    {
      absl::MutexLock hold(&backend_mu_);
      WorkItem first = Item(s, 1, 2, 1);  // blocks the worker
      ASSERT_TRUE(worker_->TryEnqueue(first));
      while (worker_->queued() != 0) absl::SleepFor(absl::Milliseconds(1));
      WorkItem rows = make(2, true), sums = make(3, false);
      ASSERT_TRUE(worker_->TryEnqueue(rows));
      ASSERT_TRUE(worker_->TryEnqueue(sums));
    }
    WaitIdle();
    worker_->Stop();
    // One Compute for both (the expanded one has a "token" per assignment).
    ASSERT_EQ(backend_.calls.size(), 2u);
    EXPECT_EQ(backend_.calls[1], native ? 2 * kTokens : 2 * 8);
    const auto& rows = s.replies[2];
    const auto& sums = s.replies[3];
    ASSERT_EQ(rows.size(), 1u);
    ASSERT_EQ(sums.size(), 1u);
    ASSERT_EQ(rows[0].error_code(), 0) << rows[0].error_message();
    ASSERT_EQ(rows[0].y().rows(), 3u + 2u + 3u);  // 3, 2 and 3 rows
    ASSERT_EQ(sums[0].y().rows(), kTokens);
    std::vector<float> r(8 * kHidden), t(kTokens * kHidden);
    ASSERT_TRUE(common::UnpackActivations(common::WireDType::kF32, rows[0].y().data(), "", 8,
                                          kHidden, r.data())
                    .ok());
    ASSERT_TRUE(common::UnpackActivations(common::WireDType::kF32, sums[0].y().data(), "", kTokens,
                                          kHidden, t.data())
                    .ok());
    const int32_t first_row[] = {0, 3, 5, 8};
    for (uint32_t k = 0; k < kTokens; ++k) {
      for (int64_t j = 0; j < kHidden; ++j) {
        float acc = r[first_row[k] * kHidden + j];
        for (int32_t a = first_row[k] + 1; a < first_row[k + 1]; ++a) {
          acc = acc + r[a * kHidden + j];
        }
        EXPECT_EQ(acc, t[k * kHidden + j]) << "token " << k << " [" << j << "]";
      }
    }
    worker_.reset();
  }
}

TEST_F(ComputeWorkerTest, AnInvalidRequestDoesNotSpoilItsBatch) {
  StartWorker();
  Sink s;
  {
    absl::MutexLock hold(&backend_mu_);
    WorkItem first = Item(s, 1, 1, 1);
    ASSERT_TRUE(worker_->TryEnqueue(first));
    while (worker_->queued() != 0) absl::SleepFor(absl::Milliseconds(1));
    WorkItem good = Item(s, 2, 1, 2), bad = Item(s, 3, 1, 2, /*expert=*/3),
             good2 = Item(s, 4, 1, 1);
    ASSERT_TRUE(worker_->TryEnqueue(good));
    ASSERT_TRUE(worker_->TryEnqueue(bad));
    ASSERT_TRUE(worker_->TryEnqueue(good2));
  }
  WaitIdle();
  EXPECT_THAT(backend_.calls, ElementsAre(1, 3));
  EXPECT_EQ(s.replies[3][0].error_code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(s.replies[3][0].error_message(), HasSubstr("layer 1 expert 3 not held by server 0"));
  EXPECT_EQ(s.replies[2][0].error_code(), 0);
  EXPECT_EQ(s.replies[4][0].error_code(), 0);
  EXPECT_EQ(s.done, 4);
}

TEST_F(ComputeWorkerTest, FullQueueRefusesWithoutTakingTheItem) {
  StartWorker(/*max_queue=*/1);
  Sink s;
  {
    absl::MutexLock hold(&backend_mu_);
    WorkItem first = Item(s, 1, 1, 1);
    ASSERT_TRUE(worker_->TryEnqueue(first));
    while (worker_->queued() != 0) absl::SleepFor(absl::Milliseconds(1));
    WorkItem second = Item(s, 2, 1, 1), third = Item(s, 3, 1, 1);
    EXPECT_TRUE(worker_->TryEnqueue(second));
    EXPECT_FALSE(worker_->TryEnqueue(third));
    ASSERT_EQ(third.chunks.size(), 1u);  // still the caller's to answer
    EXPECT_EQ(third.chunks[0]->request_id(), 3u);
  }
  worker_->Stop();  // before `s` goes
  EXPECT_EQ(s.done, 2);
}

TEST_F(ComputeWorkerTest, StopAnswersEverythingQueued) {
  StartWorker();
  Sink s;
  {
    absl::MutexLock hold(&backend_mu_);
    for (uint64_t i = 0; i < 5; ++i) {
      WorkItem it = Item(s, i, 1 + i % 2, 3);
      ASSERT_TRUE(worker_->TryEnqueue(it));
    }
  }
  worker_->Stop();
  EXPECT_EQ(s.done, 5);
  EXPECT_EQ(s.replies.size(), 5u);
  WorkItem late = Item(s, 9, 1, 1);
  EXPECT_FALSE(worker_->TryEnqueue(late));
}

}  // namespace
}  // namespace dmoe::expert::internal
