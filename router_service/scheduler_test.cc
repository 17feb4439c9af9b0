// The continuous-batching Scheduler on a real core::Model (a generated
// tiny-v3 checkpoint, f32, CPU experts): strict FIFO admission, the per-step
// token budget, chunked prefill, cancellation and the KV-cache refusal.
//
// Every test records a timeline: SchedulerOptions::on_step runs on the
// scheduler thread after each Model::Forward and before that step's token
// callbacks, so each token is tagged with the number of the step that made it.
// To make the batches deterministic, a "blocker" request (one prompt token,
// one generated token) holds the scheduler thread inside its on_token callback
// (step 1) while the test queues the requests under test; they are then all
// admitted together at the next admission.
#include "router_service/scheduler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/kv_cache.h"
#include "core/model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "tests/test_util.h"

namespace dmoe::router {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::IsOk;
using ::testing::Pair;
using testing::StatusIs;

// What the scheduler reported, in order, from its thread.
class Timeline {
 public:
  void Step() {
    absl::MutexLock l(&mu_);
    ++steps_;
  }
  // "STEP:NAME#INDEX" for every generated token.
  void Token(const std::string& name, const TokenEvent& ev) {
    absl::MutexLock l(&mu_);
    tokens_.push_back(absl::StrCat(steps_, ":", name, "#", ev.index));
  }
  void Done(const std::string& name, const absl::Status& st) {
    absl::MutexLock l(&mu_);
    done_.emplace_back(name, st.code());
  }
  // Waits (at most a minute) until `n` requests have ended.
  bool WaitDone(size_t n) {
    absl::MutexLock l(&mu_);
    auto enough = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return done_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Minutes(1));
  }
  std::vector<std::string> tokens() const {
    absl::MutexLock l(&mu_);
    return tokens_;
  }
  std::vector<std::pair<std::string, absl::StatusCode>> done() const {
    absl::MutexLock l(&mu_);
    return done_;
  }
  int steps() const {
    absl::MutexLock l(&mu_);
    return steps_;
  }

 private:
  mutable absl::Mutex mu_;
  int steps_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> tokens_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<std::string, absl::StatusCode>> done_ ABSL_GUARDED_BY(mu_);
};

class SchedulerTest : public ::testing::Test {
 protected:
  // A scheduler over the real model with a KV budget of `kv_tokens` tokens,
  // in blocks of `block_tokens` (1: admission is token-exact).
  void Start(int64_t kv_tokens, int64_t max_batch_tokens, int64_t block_tokens = 1,
             KvAdmission admission = KvAdmission::kReserve) {
    if (dir_.empty()) dir_ = testing::MakeModel("tiny-v3", 21);
    block_tokens_ = block_tokens;
    admission_ = admission;
    scheduler_ = Create(kv_tokens, max_batch_tokens, &timeline_);
    ASSERT_NE(scheduler_, nullptr);
  }

  std::unique_ptr<Scheduler> Create(int64_t kv_tokens, int64_t max_batch_tokens,
                                    Timeline* timeline) {
    core::ModelOptions mo;
    mo.compute = core::ComputeType::kF32;
    auto model = core::Model::Load(dir_, std::move(mo));
    EXPECT_THAT(model, IsOk());
    if (!model.ok()) return nullptr;
    bytes_per_token_ = core::KvCache((*model)->config(), 0, 1, false, kv_dtype_).BytesPerToken();
    SchedulerOptions o;
    o.kv_cache_bytes = static_cast<size_t>(kv_tokens) * bytes_per_token_;
    o.max_batch_tokens = max_batch_tokens;
    o.kv_block_tokens = block_tokens_;
    o.kv_admission = admission_;
    o.prefix_cache = prefix_cache_;
    o.kv_dtype = kv_dtype_;
    o.on_step = [timeline](absl::Duration) { timeline->Step(); };
    o.on_step_stages = [this](const core::StageTimes& t, bool prefill) {
      absl::MutexLock l(&stages_mu_);
      stages_.push_back({t, prefill});
    };
    auto s = Scheduler::Create(*std::move(model), o);
    EXPECT_THAT(s, IsOk());
    return s.ok() ? *std::move(s) : nullptr;
  }

  // Queues a generation of `max_tokens` tokens (eos ignored, so exactly that
  // many unless cancelled) recorded on the timeline as `name`.
  absl::StatusOr<RequestId> Generate(
      const std::string& name, std::vector<int32_t> prompt, int64_t max_tokens,
      std::function<void(const TokenEvent&)> also_on_token = nullptr) {
    GenerateParams p;
    p.prompt = std::move(prompt);
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    p.request_id = name;
    GenerateCallbacks cb;
    cb.on_token = [this, name, also_on_token](const TokenEvent& ev) {
      timeline_.Token(name, ev);
      if (also_on_token) also_on_token(ev);
    };
    cb.on_done = [this, name](const absl::Status& st) { timeline_.Done(name, st); };
    return scheduler_->SubmitGenerate(std::move(p), std::move(cb));
  }

  // Holds the scheduler thread in step 1 until ReleaseBlocker().
  void StartBlocker() {
    ASSERT_THAT(Generate("blocker", {5}, 1,
                         [this](const TokenEvent&) {
                           blocker_entered_.Notify();
                           release_blocker_.WaitForNotification();
                         }),
                IsOk());
    ASSERT_TRUE(blocker_entered_.WaitForNotificationWithTimeout(absl::Minutes(1)));
  }
  void ReleaseBlocker() { release_blocker_.Notify(); }

  void TearDown() override {
    if (!release_blocker_.HasBeenNotified()) release_blocker_.Notify();
    if (scheduler_) scheduler_->Shutdown(absl::ZeroDuration());
  }

  std::string dir_;
  int64_t block_tokens_ = 1;
  KvAdmission admission_ = KvAdmission::kReserve;
  bool prefix_cache_ = true;
  core::KvDtype kv_dtype_ = core::KvDtype::kF32;
  size_t bytes_per_token_ = 0;
  absl::Mutex stages_mu_;
  std::vector<std::pair<core::StageTimes, bool>> stages_ ABSL_GUARDED_BY(stages_mu_);
  Timeline timeline_;
  std::unique_ptr<Scheduler> scheduler_;
  absl::Notification blocker_entered_, release_blocker_;
};

// Every step reports where its time went: the model's stages, sampling and
// the scheduler's own share; the prompt's step is a prefill step, the rest
// decode steps.
TEST_F(SchedulerTest, EveryStepReportsItsStagesAndPhase) {
  Start(/*kv_tokens=*/64, /*max_batch_tokens=*/64);
  ASSERT_THAT(Generate("a", {5, 6, 7, 8, 9, 10}, 4), IsOk());
  ASSERT_TRUE(timeline_.WaitDone(1));
  scheduler_->Shutdown(absl::ZeroDuration());
  absl::MutexLock l(&stages_mu_);
  ASSERT_EQ(stages_.size(), 4u);  // prefill + first token, then 3 decode steps
  EXPECT_TRUE(stages_[0].second);
  for (size_t i = 1; i < stages_.size(); ++i) EXPECT_FALSE(stages_[i].second) << i;
  for (const auto& [t, prefill] : stages_) {
    for (core::Stage st : {core::Stage::kEmbed, core::Stage::kNorm, core::Stage::kAttention,
                           core::Stage::kGate, core::Stage::kExperts, core::Stage::kDenseFfn,
                           core::Stage::kCombine, core::Stage::kLmHead, core::Stage::kSample}) {
      EXPECT_GT(t.Get(st), 0.0) << core::StageName(st);
    }
    EXPECT_GE(t.Get(core::Stage::kSchedule), 0.0);
    EXPECT_LT(t.Total(), 60.0);
  }
}

// A (4 tokens of cache) is admitted; B (4) does not fit next to it, and C (2),
// which would, waits behind B: nothing overtakes the head of the queue.
TEST_F(SchedulerTest, AdmissionIsStrictlyFifo) {
  Start(/*kv_tokens=*/6, /*max_batch_tokens=*/64);
  StartBlocker();
  ASSERT_THAT(Generate("A", {10, 11}, 2), IsOk());
  ASSERT_THAT(Generate("B", {12, 13}, 2), IsOk());
  ASSERT_THAT(Generate("C", {14}, 1), IsOk());
  EXPECT_EQ(scheduler_->GetLoad().queued_requests, 3);
  ReleaseBlocker();
  ASSERT_TRUE(timeline_.WaitDone(4));

  EXPECT_THAT(timeline_.tokens(),
              ElementsAre("1:blocker#0", "2:A#0", "3:A#1", "4:B#0", "4:C#0", "5:B#1"));
  EXPECT_THAT(timeline_.done(),
              ElementsAre(Pair("blocker", absl::StatusCode::kOk), Pair("A", absl::StatusCode::kOk),
                          Pair("C", absl::StatusCode::kOk), Pair("B", absl::StatusCode::kOk)));
  const SchedulerLoad load = scheduler_->GetLoad();
  EXPECT_EQ(load.active_sequences, 0);
  EXPECT_EQ(load.queued_requests, 0);
  EXPECT_EQ(load.kv_cache_free_bytes, 6 * bytes_per_token_);
}

// Two tokens a step: decoders first, then prefills in admission order; C's
// prefill waits until a step has room.
TEST_F(SchedulerTest, EveryStepStaysWithinTheTokenBudget) {
  Start(/*kv_tokens=*/64, /*max_batch_tokens=*/2);
  StartBlocker();
  ASSERT_THAT(Generate("A", {20}, 3), IsOk());
  ASSERT_THAT(Generate("B", {21}, 3), IsOk());
  ASSERT_THAT(Generate("C", {22}, 3), IsOk());
  ReleaseBlocker();
  ASSERT_TRUE(timeline_.WaitDone(4));

  EXPECT_THAT(timeline_.tokens(), ElementsAre("1:blocker#0", "2:A#0", "2:B#0", "3:A#1", "3:B#1",
                                              "4:A#2", "4:B#2", "5:C#0", "6:C#1", "7:C#2"));
  const SchedulerLoad load = scheduler_->GetLoad();
  EXPECT_EQ(load.steps, 7u);
  EXPECT_EQ(timeline_.steps(), 7);
  // 1 (blocker) + 2 + 2 + 2 + 1 + 1 + 1.
  EXPECT_EQ(load.step_tokens, 10u);
  EXPECT_EQ(load.failed_steps, 0u);
}

// A 10-token prompt with a budget of 4 tokens a step goes in chunks of 3, 3, 3
// and 1 next to a decoder that keeps its one token every step; its first token
// comes in the step that completes the prompt.
TEST_F(SchedulerTest, LongPromptIsPrefilledInChunksAlongsideDecoding) {
  Start(/*kv_tokens=*/64, /*max_batch_tokens=*/4);
  StartBlocker();
  ASSERT_THAT(Generate("D", {30}, 4), IsOk());
  ASSERT_THAT(Generate("L", {40, 41, 42, 43, 44, 45, 46, 47, 48, 49}, 1), IsOk());
  ReleaseBlocker();
  ASSERT_TRUE(timeline_.WaitDone(3));

  EXPECT_THAT(timeline_.tokens(),
              ElementsAre("1:blocker#0", "2:D#0", "3:D#1", "4:D#2", "5:D#3", "5:L#0"));
  const SchedulerLoad load = scheduler_->GetLoad();
  EXPECT_EQ(load.steps, 5u);
  // 1 (blocker) + (1 + 3) + (1 + 3) + (1 + 3) + (1 + 1).
  EXPECT_EQ(load.step_tokens, 15u);
}

// Chunking changes nothing but rounding: the logits of every position of a
// prompt prefilled 3 tokens a step match a whole-prompt prefill.
TEST_F(SchedulerTest, ChunkedPrefillGivesTheLogitsOfAWholePrefill) {
  dir_ = testing::MakeModel("tiny-v3", 22);
  Timeline chunked_timeline, whole_timeline;
  auto chunked = Create(/*kv_tokens=*/64, /*max_batch_tokens=*/3, &chunked_timeline);
  auto whole = Create(/*kv_tokens=*/64, /*max_batch_tokens=*/64, &whole_timeline);
  ASSERT_NE(chunked, nullptr);
  ASSERT_NE(whole, nullptr);
  const std::vector<int32_t> prompt = {7, 100, 3, 250, 9, 9, 480, 1, 66, 12};

  auto forward = [&](Scheduler& s) {
    absl::Notification done;
    absl::StatusOr<ForwardResult> result = absl::UnknownError("no callback");
    EXPECT_THAT(s.SubmitForward(prompt, /*all_positions=*/true,
                                [&](absl::StatusOr<ForwardResult> r) {
                                  result = std::move(r);
                                  done.Notify();
                                }),
                IsOk());
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Minutes(1)));
    return result;
  };
  const absl::StatusOr<ForwardResult> a = forward(*chunked);
  const absl::StatusOr<ForwardResult> b = forward(*whole);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  // ceil(10 / 3) steps carrying the 10 tokens, against one.
  EXPECT_EQ(chunked->GetLoad().steps, 4u);
  EXPECT_EQ(chunked->GetLoad().step_tokens, 10u);
  EXPECT_EQ(whole->GetLoad().steps, 1u);

  const int64_t vocab = chunked->config().vocab_size;
  ASSERT_EQ(a->rows, 10);
  ASSERT_EQ(b->rows, 10);
  ASSERT_EQ(a->vocab, vocab);
  ASSERT_EQ(a->logits.size(), static_cast<size_t>(10 * vocab));
  ASSERT_EQ(b->logits.size(), a->logits.size());
  for (int64_t r = 0; r < 10; ++r) {
    double row_max = 0;
    for (int64_t v = 0; v < vocab; ++v)
      row_max = std::max(row_max, double(std::fabs(b->logits[r * vocab + v])));
    for (int64_t v = 0; v < vocab; ++v) {
      ASSERT_NEAR(a->logits[r * vocab + v], b->logits[r * vocab + v], 1e-4 * row_max)
          << "position " << r << " token " << v;
    }
  }
  chunked->Shutdown(absl::ZeroDuration());
  whole->Shutdown(absl::ZeroDuration());
}

// B is cancelled while queued (no token, CANCELLED before A runs); A cancels
// itself from its third token's callback and ends at the next step; C, which
// did not fit next to A, then gets A's cache and runs to completion.
TEST_F(SchedulerTest, CancelEndsQueuedAndRunningRequestsAndFreesTheirCache) {
  Start(/*kv_tokens=*/12, /*max_batch_tokens=*/64);
  StartBlocker();
  absl::StatusOr<RequestId> a = absl::UnknownError("not yet");
  a = Generate("A", {50}, 8, [this, &a](const TokenEvent& ev) {
    if (ev.index == 2) scheduler_->Cancel(*a);
  });
  ASSERT_THAT(a, IsOk());
  const absl::StatusOr<RequestId> b = Generate("B", {51}, 8);
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(Generate("C", {52}, 8), IsOk());
  scheduler_->Cancel(*b);
  scheduler_->Cancel(987654);  // unknown: nothing happens
  ReleaseBlocker();
  ASSERT_TRUE(timeline_.WaitDone(4));

  EXPECT_THAT(timeline_.tokens(),
              ElementsAre("1:blocker#0", "2:A#0", "3:A#1", "4:A#2", "5:C#0", "6:C#1", "7:C#2",
                          "8:C#3", "9:C#4", "10:C#5", "11:C#6", "12:C#7"));
  EXPECT_THAT(
      timeline_.done(),
      ElementsAre(Pair("blocker", absl::StatusCode::kOk), Pair("B", absl::StatusCode::kCancelled),
                  Pair("A", absl::StatusCode::kCancelled), Pair("C", absl::StatusCode::kOk)));
  scheduler_->Cancel(*a);  // finished: nothing happens
  const SchedulerLoad load = scheduler_->GetLoad();
  EXPECT_EQ(load.active_sequences, 0);
  EXPECT_EQ(load.kv_cache_free_bytes, 12 * bytes_per_token_);
}

// A request whose prompt + max_tokens exceeds the whole KV budget is refused at
// once, naming the sizes, with no callback; requests that fit still run.
TEST_F(SchedulerTest, RequestLargerThanTheKvBudgetIsRefusedAndOthersRun) {
  Start(/*kv_tokens=*/10, /*max_batch_tokens=*/64);
  const size_t bpt = bytes_per_token_;
  ASSERT_GT(bpt, 0u);

  EXPECT_THAT(Generate("big", {60, 61, 62, 63}, 8),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr(absl::StrCat(
                           "request needs ", 12 * bpt,
                           " bytes of KV cache (4 prompt + 8 max_tokens = 12 tokens x ", bpt,
                           " bytes, in blocks of 1 tokens), more than the router's whole KV "
                           "cache of ",
                           10 * bpt, " bytes"))));
  EXPECT_THAT(scheduler_->SubmitForward(
                  std::vector<int32_t>(11, 3), false,
                  [](absl::StatusOr<ForwardResult>) { ADD_FAILURE() << "refused: no callback"; }),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr(absl::StrCat("request needs ", 11 * bpt,
                                              " bytes of KV cache (11 prompt tokens = "
                                              "11 tokens x ",
                                              bpt, " bytes, in blocks of 1 tokens)"))));

  // Exactly the budget: runs, one at a time.
  ASSERT_THAT(Generate("A", {60, 61}, 8), IsOk());
  ASSERT_THAT(Generate("B", {60, 61, 62, 63}, 6), IsOk());
  ASSERT_TRUE(timeline_.WaitDone(2));
  EXPECT_THAT(timeline_.done(),
              ElementsAre(Pair("A", absl::StatusCode::kOk), Pair("B", absl::StatusCode::kOk)));
  const std::vector<std::string> tokens = timeline_.tokens();
  ASSERT_EQ(tokens.size(), 14u);
  EXPECT_THAT(tokens.front(), HasSubstr(":A#0"));
  EXPECT_THAT(tokens[7], HasSubstr(":A#7"));
  EXPECT_THAT(tokens[8], HasSubstr(":B#0"));
  EXPECT_THAT(tokens.back(), HasSubstr(":B#5"));
  EXPECT_EQ(scheduler_->GetLoad().kv_cache_free_bytes, 10 * bpt);
}

// With blocks of 16 tokens a sequence reserves whole blocks: 17 tokens take
// two, so two such requests cannot share a 3-block cache, and a request over
// the blocks the budget holds is refused naming them.
TEST_F(SchedulerTest, ReservationsAreWholeBlocks) {
  Start(/*kv_tokens=*/50, /*max_batch_tokens=*/64,
        /*block_tokens=*/16);  // 3 blocks, 2 tokens' bytes over
  const size_t bpt = bytes_per_token_;
  EXPECT_EQ(scheduler_->GetLoad().kv_cache_budget_bytes, 48 * bpt);
  EXPECT_EQ(scheduler_->GetLoad().kv_cache_free_bytes, 48 * bpt);
  EXPECT_THAT(Generate("big", {1, 2, 3}, 46),  // 49 tokens: 4 blocks
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr(absl::StrCat("request needs ", 64 * bpt,
                                              " bytes of KV cache (3 prompt + 46 max_tokens = 49 "
                                              "tokens x ",
                                              bpt,
                                              " bytes, in blocks of 16 tokens), more than "
                                              "the router's whole KV cache of ",
                                              48 * bpt, " bytes (3 blocks"))));
  ASSERT_THAT(Generate("A", {60, 61}, 15), IsOk());  // 17 tokens: 2 blocks
  ASSERT_THAT(Generate("B", {60, 61}, 15), IsOk());  // waits for A's blocks
  ASSERT_TRUE(timeline_.WaitDone(2));
  const std::vector<std::string> tokens = timeline_.tokens();
  ASSERT_EQ(tokens.size(), 30u);
  EXPECT_THAT(tokens[14], HasSubstr(":A#14"));  // A ran alone to its end
  EXPECT_THAT(tokens[15], HasSubstr(":B#0"));
  EXPECT_EQ(scheduler_->GetLoad().kv_cache_free_bytes, 48 * bpt);
}

// Paged admission under a cache far too small for everyone at once: sequences
// are preempted and recomputed instead of failing, and every request's tokens
// (seeded sampling, so the sampler's state matters) equal those it gets alone.
TEST_F(SchedulerTest, PreemptionRecomputesAndChangesNoToken) {
  if (dir_.empty()) dir_ = testing::MakeModel("tiny-v3", 21);
  struct Req {
    std::vector<int32_t> prompt;
    int64_t max_tokens;
    uint64_t seed;
  };
  std::vector<Req> reqs;
  for (int i = 0; i < 6; ++i) {
    std::vector<int32_t> prompt;
    for (int j = 0; j < 5 + i; ++j) prompt.push_back((37 * i + 11 * j + 3) % 500);
    reqs.push_back({prompt, 24 + 3 * i, 100 + static_cast<uint64_t>(i)});
  }
  struct Out {
    absl::Mutex mu;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<absl::StatusCode> codes;
    int done = 0;
  };
  auto run = [&](Scheduler& s, const std::vector<size_t>& which, Out& out, bool one_at_a_time) {
    out.tokens.assign(reqs.size(), {});
    out.codes.assign(reqs.size(), absl::StatusCode::kUnknown);
    for (size_t i : which) {
      GenerateParams p;
      p.prompt = reqs[i].prompt;
      p.max_tokens = reqs[i].max_tokens;
      p.ignore_eos = true;
      p.sampling.temperature = 0.9;
      p.sampling.seed = reqs[i].seed;
      GenerateCallbacks cb;
      cb.on_token = [&out, i](const TokenEvent& ev) {
        absl::MutexLock l(&out.mu);
        out.tokens[i].push_back(ev.token);
      };
      cb.on_done = [&out, i](const absl::Status& st) {
        absl::MutexLock l(&out.mu);
        out.codes[i] = st.code();
        ++out.done;
      };
      const int before = [&] {
        absl::MutexLock l(&out.mu);
        return out.done;
      }();
      ASSERT_THAT(s.SubmitGenerate(std::move(p), std::move(cb)), IsOk());
      if (one_at_a_time) {
        absl::MutexLock l(&out.mu);
        auto next = [&]() ABSL_SHARED_LOCKS_REQUIRED(out.mu) { return out.done > before; };
        ASSERT_TRUE(out.mu.AwaitWithTimeout(absl::Condition(&next), absl::Minutes(1)));
      }
    }
    absl::MutexLock l(&out.mu);
    auto all = [&]() ABSL_SHARED_LOCKS_REQUIRED(out.mu) {
      return out.done == static_cast<int>(which.size());
    };
    ASSERT_TRUE(out.mu.AwaitWithTimeout(absl::Condition(&all), absl::Minutes(2)));
  };
  std::vector<size_t> all(reqs.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;

  // Alone, with room for everything.
  block_tokens_ = 16;
  admission_ = KvAdmission::kReserve;
  Timeline alone_timeline;
  auto alone = Create(/*kv_tokens=*/4096, /*max_batch_tokens=*/64, &alone_timeline);
  ASSERT_NE(alone, nullptr);
  Out want;
  run(*alone, all, want, /*one_at_a_time=*/true);

  // Together, paged, in 4 blocks of 16 tokens: one request alone needs up to 3.
  admission_ = KvAdmission::kPaged;
  Timeline paged_timeline;
  auto paged = Create(/*kv_tokens=*/64, /*max_batch_tokens=*/64, &paged_timeline);
  ASSERT_NE(paged, nullptr);
  Out got;
  run(*paged, all, got, /*one_at_a_time=*/false);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(got.codes[i], absl::StatusCode::kOk) << "request " << i;
    EXPECT_EQ(static_cast<int64_t>(got.tokens[i].size()), reqs[i].max_tokens) << i;
    EXPECT_EQ(got.tokens[i], want.tokens[i]) << "request " << i << " changed by preemption";
  }
  const SchedulerLoad load = paged->GetLoad();
  EXPECT_GT(load.preemptions, 0u);
  EXPECT_GT(load.recomputed_tokens, 0u);
  EXPECT_EQ(load.kv_blocks_total, 4);
  EXPECT_EQ(load.kv_blocks_used, 0);
  EXPECT_EQ(load.kv_cache_free_bytes, load.kv_cache_budget_bytes);
  EXPECT_EQ(load.active_sequences, 0);
  EXPECT_EQ(alone->GetLoad().preemptions, 0u);
}

// The prefix cache changes no bit: generations (seeded sampling) and the
// logits of forward requests over long shared prefixes, prefixes ending inside
// a block, a repeated prompt (wholly cached but for its last token) and a
// cache small enough to evict are equal with it on and off, alone or together.
TEST_F(SchedulerTest, PrefixCacheChangesNoTokenAndNoLogit) {
  if (dir_.empty()) dir_ = testing::MakeModel("tiny-v3", 21);
  std::vector<int32_t> system;
  for (int j = 0; j < 40; ++j) system.push_back((13 * j + 7) % 500);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 5; ++i) {
    std::vector<int32_t> p(system.begin(), system.begin() + (i == 3 ? 21 : 40));
    for (int j = 0; j < 3 + i; ++j) p.push_back((29 * i + 5 * j + 1) % 500);
    prompts.push_back(p);
  }
  prompts.push_back(prompts[1]);  // the same prompt again
  prompts.push_back(system);      // the shared part alone: 2 full blocks of 16 and 8 tokens
  struct Out {
    absl::Mutex mu;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<std::vector<float>> logits;  // forward requests: every position
    std::vector<std::vector<float>> last;    // forward requests: the last position
    int done = 0;
    int failed = 0;
  };
  // Each prompt as a seeded generation, then as two forward requests.
  auto run = [&](Scheduler& s, Out& out, bool one_at_a_time) {
    const size_t n = prompts.size();
    out.tokens.assign(n, {});
    out.logits.assign(n, {});
    out.last.assign(n, {});
    int submitted = 0;
    auto wait = [&](int count) {
      absl::MutexLock l(&out.mu);
      auto enough = [&]() ABSL_SHARED_LOCKS_REQUIRED(out.mu) { return out.done >= count; };
      ASSERT_TRUE(out.mu.AwaitWithTimeout(absl::Condition(&enough), absl::Minutes(2)));
    };
    for (size_t i = 0; i < n; ++i) {
      GenerateParams p;
      p.prompt = prompts[i];
      p.max_tokens = 12;
      p.ignore_eos = true;
      p.sampling.temperature = 0.8;
      p.sampling.seed = 40 + i;
      GenerateCallbacks cb;
      cb.on_token = [&out, i](const TokenEvent& ev) {
        absl::MutexLock l(&out.mu);
        out.tokens[i].push_back(ev.token);
      };
      cb.on_done = [&out](const absl::Status& st) {
        absl::MutexLock l(&out.mu);
        ++out.done;
        if (!st.ok()) ++out.failed;
      };
      ASSERT_THAT(s.SubmitGenerate(std::move(p), std::move(cb)), IsOk());
      ++submitted;
      if (one_at_a_time) wait(submitted);
      for (bool all : {true, false}) {
        ASSERT_THAT(s.SubmitForward(prompts[i], all,
                                    [&out, i, all](absl::StatusOr<ForwardResult> r) {
                                      absl::MutexLock l(&out.mu);
                                      ++out.done;
                                      if (!r.ok()) {
                                        ++out.failed;
                                        return;
                                      }
                                      (all ? out.logits : out.last)[i] = std::move(r->logits);
                                    }),
                    IsOk());
        ++submitted;
        if (one_at_a_time) wait(submitted);
      }
    }
    wait(submitted);
  };
  for (core::KvDtype kv_dtype : {core::KvDtype::kF32, core::KvDtype::kF16, core::KvDtype::kBF16}) {
    SCOPED_TRACE(absl::StrCat(core::KvDtypeName(kv_dtype), " KV cache"));
    kv_dtype_ = kv_dtype;
    block_tokens_ = 16;
    admission_ = KvAdmission::kPaged;
    prefix_cache_ = false;
    Timeline off_timeline;
    auto off = Create(/*kv_tokens=*/4096, /*max_batch_tokens=*/64, &off_timeline);
    ASSERT_NE(off, nullptr);
    Out want;
    run(*off, want, /*one_at_a_time=*/true);
    ASSERT_EQ(want.failed, 0);
    EXPECT_EQ(off->GetLoad().prefix_hit_tokens, 0u);

    prefix_cache_ = true;
    for (int64_t kv_tokens : {4096, 96}) {  // 96: 6 blocks, evicting
      for (bool one_at_a_time : {true, false}) {
        SCOPED_TRACE(::testing::Message()
                     << "kv_tokens " << kv_tokens << " one at a time " << one_at_a_time);
        Timeline on_timeline;
        auto on = Create(kv_tokens, /*max_batch_tokens=*/64, &on_timeline);
        ASSERT_NE(on, nullptr);
        Out got;
        run(*on, got, one_at_a_time);
        EXPECT_EQ(got.failed, 0);
        for (size_t i = 0; i < prompts.size(); ++i) {
          EXPECT_EQ(got.tokens[i], want.tokens[i]) << "prompt " << i;
          EXPECT_EQ(got.logits[i], want.logits[i]) << "prompt " << i << ": every position";
          EXPECT_EQ(got.last[i], want.last[i]) << "prompt " << i << ": last position";
        }
        const SchedulerLoad load = on->GetLoad();
        EXPECT_LT(load.prefix_hit_tokens, load.prefix_queried_tokens);
        // Submitted together, the requests are admitted before any block is
        // cached (their equal blocks are shared once computed).
        if (one_at_a_time) {
          EXPECT_GT(load.prefix_hit_tokens, 0u);
        }
        if (one_at_a_time && kv_tokens == 4096) {
          // Later prompts find the system prompt's two full blocks (32 tokens).
          EXPECT_GE(load.prefix_hit_tokens, 32u * 4);
        }
        if (kv_tokens == 96) {
          EXPECT_GT(load.prefix_evicted_blocks, 0u);
        }
        EXPECT_EQ(load.kv_blocks_used, 0);
        EXPECT_GT(load.kv_blocks_cached, 0);
        EXPECT_EQ(load.kv_cache_free_bytes, load.kv_cache_budget_bytes);
      }
    }
  }
}

// Property: random arrivals, random cancellations, a cache far too small
// (preemptions), chunked prefills, shared prefixes (prefix cache) and several
// block sizes: every request that is not cancelled streams exactly the tokens
// it streams alone, a cancelled one a prefix of them, nothing fails, and every
// block is back at the end.
TEST_F(SchedulerTest, RandomArrivalsAndCancellationsChangeNoToken) {
  if (dir_.empty()) dir_ = testing::MakeModel("tiny-v3", 21);
  std::mt19937 rng(20261207);
  struct Req {
    std::vector<int32_t> prompt;
    int64_t max_tokens;
    uint64_t seed;
    int64_t cancel_at;  // -1: never; else Cancel from the callback of this token index
  };
  const std::vector<int32_t> shared = {7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18};
  std::vector<Req> reqs;
  for (int i = 0; i < 12; ++i) {
    Req r;
    if (rng() % 2 == 0) r.prompt = shared;  // a shared prefix
    const int n = 1 + static_cast<int>(rng() % 10);
    for (int j = 0; j < n; ++j) r.prompt.push_back(static_cast<int32_t>(rng() % 500));
    r.max_tokens = 4 + static_cast<int64_t>(rng() % 16);
    r.seed = 1000 + static_cast<uint64_t>(i);
    r.cancel_at = rng() % 4 == 0 ? static_cast<int64_t>(rng() % r.max_tokens) : -1;
    reqs.push_back(r);
  }
  struct Out {
    absl::Mutex mu;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<absl::StatusCode> codes;
    int done = 0;
  };
  // Submits every request (with `cancels`, from the token callbacks), waiting
  // `gap_us[i]` before request i (-1: until the previous one ended).
  auto run = [&](Scheduler& s, Out& out, const std::vector<int>& gap_us, bool cancels) {
    out.tokens.assign(reqs.size(), {});
    out.codes.assign(reqs.size(), absl::StatusCode::kUnknown);
    std::vector<absl::StatusOr<RequestId>> ids(reqs.size(), absl::UnknownError("not yet"));
    absl::Mutex ids_mu;
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (gap_us[i] < 0) {
        absl::MutexLock l(&out.mu);
        auto prev = [&]() ABSL_SHARED_LOCKS_REQUIRED(out.mu) {
          return out.done == static_cast<int>(i);
        };
        ASSERT_TRUE(out.mu.AwaitWithTimeout(absl::Condition(&prev), absl::Minutes(1)));
      } else {
        absl::SleepFor(absl::Microseconds(gap_us[i]));
      }
      GenerateParams p;
      p.prompt = reqs[i].prompt;
      p.max_tokens = reqs[i].max_tokens;
      p.ignore_eos = true;
      p.sampling.temperature = 0.9;
      p.sampling.seed = reqs[i].seed;
      GenerateCallbacks cb;
      const int64_t cancel_at = cancels ? reqs[i].cancel_at : -1;
      cb.on_token = [&, i, cancel_at](const TokenEvent& ev) {
        {
          absl::MutexLock l(&out.mu);
          out.tokens[i].push_back(ev.token);
        }
        if (ev.index == cancel_at) {
          absl::MutexLock l(&ids_mu);
          if (ids[i].ok()) s.Cancel(*ids[i]);
        }
      };
      cb.on_done = [&out, i](const absl::Status& st) {
        absl::MutexLock l(&out.mu);
        out.codes[i] = st.code();
        ++out.done;
      };
      absl::MutexLock l(&ids_mu);  // the id is known before its first callback asks
      ids[i] = s.SubmitGenerate(std::move(p), std::move(cb));
      ASSERT_THAT(ids[i], IsOk());
    }
    absl::MutexLock l(&out.mu);
    auto all = [&]() ABSL_SHARED_LOCKS_REQUIRED(out.mu) {
      return out.done == static_cast<int>(reqs.size());
    };
    ASSERT_TRUE(out.mu.AwaitWithTimeout(absl::Condition(&all), absl::Minutes(2)));
  };

  // Each KV dtype against its own reference (16-bit entries change the bits).
  for (core::KvDtype kv_dtype : {core::KvDtype::kF32, core::KvDtype::kF16}) {
    SCOPED_TRACE(absl::StrCat(core::KvDtypeName(kv_dtype), " KV cache"));
    kv_dtype_ = kv_dtype;
    block_tokens_ = 8;
    admission_ = KvAdmission::kReserve;
    prefix_cache_ = false;
    Timeline alone_timeline;
    auto alone = Create(/*kv_tokens=*/4096, /*max_batch_tokens=*/64, &alone_timeline);
    ASSERT_NE(alone, nullptr);
    Out want;
    run(*alone, want, std::vector<int>(reqs.size(), -1), /*cancels=*/false);
    for (size_t i = 0; i < reqs.size(); ++i) {
      ASSERT_EQ(want.codes[i], absl::StatusCode::kOk);
      ASSERT_EQ(static_cast<int64_t>(want.tokens[i].size()), reqs[i].max_tokens);
    }

    admission_ = KvAdmission::kPaged;
    uint64_t preemptions = 0, hits = 0;
    for (int trial = 0; trial < 6; ++trial) {
      block_tokens_ = std::vector<int64_t>{4, 8, 16}[trial % 3];
      prefix_cache_ = trial % 2 == 0;
      const int64_t max_batch = 8 + static_cast<int64_t>(rng() % 40);
      // 3 to 4 sequences' worth of blocks (the longest needs 37 tokens).
      const int64_t kv_tokens = block_tokens_ * (48 / block_tokens_ + 1 + rng() % 2);
      std::vector<int> gaps;
      for (size_t i = 0; i < reqs.size(); ++i) gaps.push_back(static_cast<int>(rng() % 3000));
      SCOPED_TRACE(::testing::Message()
                   << "trial " << trial << ": blocks of " << block_tokens_ << ", prefix cache "
                   << prefix_cache_ << ", KV tokens " << kv_tokens << ", max batch " << max_batch);
      Timeline t;
      auto s = Create(kv_tokens, max_batch, &t);
      ASSERT_NE(s, nullptr);
      Out got;
      run(*s, got, gaps, /*cancels=*/true);
      for (size_t i = 0; i < reqs.size(); ++i) {
        const std::vector<int32_t>& w = want.tokens[i];
        const std::vector<int32_t>& g = got.tokens[i];
        if (reqs[i].cancel_at < 0) {
          EXPECT_EQ(got.codes[i], absl::StatusCode::kOk) << "request " << i;
          EXPECT_EQ(g, w) << "request " << i;
        } else {
          EXPECT_TRUE(got.codes[i] == absl::StatusCode::kCancelled ||
                      got.codes[i] == absl::StatusCode::kOk)
              << "request " << i << ": " << absl::StatusCodeToString(got.codes[i]);
          EXPECT_GE(static_cast<int64_t>(g.size()), reqs[i].cancel_at + 1) << "request " << i;
          ASSERT_LE(g.size(), w.size()) << "request " << i;
          EXPECT_TRUE(std::equal(g.begin(), g.end(), w.begin())) << "request " << i;
        }
      }
      const SchedulerLoad load = s->GetLoad();
      EXPECT_EQ(load.active_sequences, 0);
      EXPECT_EQ(load.queued_requests, 0);
      EXPECT_EQ(load.kv_blocks_used, 0);
      EXPECT_EQ(load.kv_cache_free_bytes, load.kv_cache_budget_bytes);
      if (!prefix_cache_) {
        EXPECT_EQ(load.kv_blocks_cached, 0);
      }
      preemptions += load.preemptions;
      hits += load.prefix_hit_tokens;
    }
    EXPECT_GT(preemptions, 0u) << "the cache was meant to be too small";
    EXPECT_GT(hits, 0u) << "shared prefixes were meant to be found";
  }
}

}  // namespace
}  // namespace dmoe::router
