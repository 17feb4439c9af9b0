// RouterService over real gRPC on 127.0.0.1 (in-process server, client stub),
// with the experts in-process: results against core::Model run directly on the
// same checkpoint, continuous batching under concurrency, cancellation,
// validation, overload and expert failures (a fault-injecting ExpertBackend).
#include "router_service/router_server.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/expert_backend.h"
#include "core/sampler.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "router_service/scheduler.h"
#include "tests/test_util.h"

namespace dmoe::router {
namespace {

using ::testing::HasSubstr;

// An ExpertBackend that wraps the CPU backend and, on demand, blocks every
// Compute (paused), slows it down, or fails the next N calls like an expert
// server that went down.
struct FaultControl {
  absl::Mutex mu;
  bool paused ABSL_GUARDED_BY(mu) = false;
  int blocked ABSL_GUARDED_BY(mu) = 0;                // Compute calls waiting while paused
  int fail_next ABSL_GUARDED_BY(mu) = 0;              // Compute calls still to fail
  int fail_first_token_next ABSL_GUARDED_BY(mu) = 0;  // ... for the first token only
  int delay_ms ABSL_GUARDED_BY(mu) = 0;

  void Pause() {
    absl::MutexLock l(&mu);
    paused = true;
  }
  void Resume() {
    absl::MutexLock l(&mu);
    paused = false;
  }
  void FailNext(int n) {
    absl::MutexLock l(&mu);
    fail_next = n;
  }
  void FailFirstTokenNext(int n) {
    absl::MutexLock l(&mu);
    fail_first_token_next = n;
  }
  void SetDelay(int ms) {
    absl::MutexLock l(&mu);
    delay_ms = ms;
  }
  // Waits until a Compute call is blocked by Pause().
  bool WaitBlocked() {
    absl::MutexLock l(&mu);
    auto cond = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu) { return blocked > 0; };
    return mu.AwaitWithTimeout(absl::Condition(&cond), absl::Seconds(30));
  }
};

class FaultyExpertBackend final : public core::ExpertBackend {
 public:
  explicit FaultyExpertBackend(std::shared_ptr<FaultControl> control)
      : control_(std::move(control)), inner_(core::MakeCpuExpertBackend(core::ComputeType::kF32)) {}

  std::string Name() const override { return "faulty(" + inner_->Name() + ")"; }
  absl::Status LoadFfn(int32_t layer, int32_t ffn_id, const core::FfnWeights& w) override {
    return inner_->LoadFfn(layer, ffn_id, w);
  }
  absl::Status UnloadFfn(int32_t layer, int32_t ffn_id) override {
    return inner_->UnloadFfn(layer, ffn_id);
  }
  bool HasFfn(int32_t layer, int32_t ffn_id) const override {
    return inner_->HasFfn(layer, ffn_id);
  }
  size_t WeightBytes() const override { return inner_->WeightBytes(); }

  absl::Status Compute(const core::ExpertBatch& batch, float* out) override {
    int delay = 0;
    {
      FaultControl& c = *control_;
      absl::MutexLock l(&c.mu);
      ++c.blocked;
      auto running = [&c]() ABSL_SHARED_LOCKS_REQUIRED(c.mu) { return !c.paused; };
      c.mu.Await(absl::Condition(&running));
      --c.blocked;
      if (c.fail_next > 0) {
        --c.fail_next;
        return absl::UnavailableError(absl::StrCat("expert server 1 (127.0.0.1:1): layer ",
                                                   batch.layer, ": injected failure"));
      }
      if (c.fail_first_token_next > 0 && batch.num_tokens > 1) {
        --c.fail_first_token_next;
        const int32_t first = 0;
        return core::WithFailedTokens(
            absl::UnavailableError(absl::StrCat("expert server 1 (127.0.0.1:1): layer ",
                                                batch.layer, ": injected failure of token 0")),
            {&first, 1});
      }
      delay = c.delay_ms;
    }
    if (delay > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    return inner_->Compute(batch, out);
  }

 private:
  std::shared_ptr<FaultControl> control_;
  std::unique_ptr<core::ExpertBackend> inner_;
};

std::unique_ptr<core::Model> LoadModel(const std::string& dir,
                                       std::unique_ptr<core::ExpertBackend> experts = nullptr) {
  core::ModelOptions opts;
  opts.compute = core::ComputeType::kF32;
  opts.experts = std::move(experts);
  auto m = core::Model::Load(dir, std::move(opts));
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(m).value() : nullptr;
}

// A router on 127.0.0.1:<any> and a stub connected to it.
struct TestRouter {
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<RouterServer> service;
  StartedServer server;
  std::unique_ptr<v1::RouterService::Stub> stub;

  ~TestRouter() {
    if (scheduler) scheduler->Shutdown(absl::ZeroDuration());
    if (server.server) server.server->Shutdown();
  }
};

std::unique_ptr<TestRouter> StartRouter(const std::string& dir, SchedulerOptions opts,
                                        std::unique_ptr<core::ExpertBackend> experts = nullptr) {
  auto r = std::make_unique<TestRouter>();
  auto model = LoadModel(dir, std::move(experts));
  if (!model) return nullptr;
  auto s = Scheduler::Create(std::move(model), opts);
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return nullptr;
  r->scheduler = std::move(s).value();
  r->service = std::make_unique<RouterServer>(*r->scheduler);
  auto started = StartRouterGrpcServer(r->service.get(), "127.0.0.1", 0);
  EXPECT_TRUE(started.ok()) << started.status();
  if (!started.ok()) return nullptr;
  r->server = std::move(started).value();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  r->stub = v1::RouterService::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(r->server.port), grpc::InsecureChannelCredentials(), args));
  return r;
}

std::vector<int32_t> Prompt(int n, int vocab, int seed) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back((i * 131 + seed * 17 + 7) % vocab);
  return t;
}

struct Generated {
  std::vector<int32_t> tokens;
  std::string finish;
};

// The reference: one sequence alone through core::Model with the KV cache, as
// `dmoe generate` does it.
Generated DirectGenerate(core::Model& m, const std::vector<int32_t>& prompt, int max_tokens,
                         core::SamplingParams sp = {}, bool ignore_eos = false) {
  core::KvCache cache(m.config(), 64 << 20);
  auto seq = cache.Allocate(static_cast<int64_t>(prompt.size()) + max_tokens);
  EXPECT_TRUE(seq.ok()) << seq.status();
  core::Sampler sampler(sp);
  Generated out;
  out.finish = "length";
  std::vector<int32_t> step = prompt;
  std::vector<float> logits;
  while (static_cast<int>(out.tokens.size()) < max_tokens) {
    core::SeqInput in{*seq, step, false};
    auto st = m.Forward({&in, 1}, cache, &logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) break;
    const int32_t next = sampler.Sample(logits);
    out.tokens.push_back(next);
    const auto& eos = m.config().eos_token_ids;
    if (!ignore_eos && std::find(eos.begin(), eos.end(), next) != eos.end()) {
      out.finish = "stop";
      break;
    }
    step.assign(1, next);
  }
  return out;
}

struct StreamResult {
  std::vector<int32_t> tokens;
  std::string finish;
  uint32_t prompt_tokens = 0;
  grpc::Status status;
};

v1::GenerateRequest MakeRequest(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.add_prompt_tokens(t);
  req.set_max_tokens(max_tokens);
  return req;
}

// Runs one Generate stream to its end. `on_token` (optional) sees each token.
StreamResult RunStream(v1::RouterService::Stub& stub, const v1::GenerateRequest& req,
                       grpc::ClientContext* ctx = nullptr,
                       const std::function<void(int)>& on_token = nullptr) {
  grpc::ClientContext own;
  if (ctx == nullptr) ctx = &own;
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  StreamResult out;
  auto reader = stub.Generate(ctx, req);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    EXPECT_EQ(msg.index(), out.tokens.size());
    if (msg.index() == 0) out.prompt_tokens = msg.prompt_tokens();
    EXPECT_TRUE(out.finish.empty()) << "a token after the finish reason";
    out.tokens.push_back(msg.token());
    out.finish = msg.finish_reason();
    if (on_token) on_token(static_cast<int>(out.tokens.size()));
  }
  out.status = reader->Finish();
  return out;
}

v1::RouterLoadResponse GetLoad(v1::RouterService::Stub& stub) {
  grpc::ClientContext ctx;
  v1::RouterLoadResponse resp;
  auto st = stub.GetLoad(&ctx, v1::RouterLoadRequest(), &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return resp;
}

// Polls GetLoad until `pred` holds (or 30 s pass).
bool WaitForLoad(v1::RouterService::Stub& stub,
                 const std::function<bool(const v1::RouterLoadResponse&)>& pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred(GetLoad(stub))) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

size_t BytesPerToken(const core::ModelConfig& cfg) { return core::KvCache(cfg, 0).BytesPerToken(); }

// The KV bytes a router with `o` can hand out: the whole blocks of its budget.
size_t UsableKvBytes(const std::string& model_dir, const SchedulerOptions& o) {
  auto cfg = core::ModelConfig::FromFile(model_dir + "/config.json");
  EXPECT_TRUE(cfg.ok()) << cfg.status();
  if (!cfg.ok()) return 0;
  const core::KvCache cache(*cfg, o.kv_cache_bytes, o.kv_block_tokens);
  return static_cast<size_t>(cache.total_blocks()) * cache.BlockBytes();
}

TEST(RouterServer, ForwardLogitsEqualDirectModel) {
  const std::string dir = testing::MakeModel("tiny-v3", 3);
  auto router = StartRouter(dir, {});
  ASSERT_NE(router, nullptr);
  auto direct = LoadModel(dir);
  ASSERT_NE(direct, nullptr);
  const int64_t V = direct->config().vocab_size;
  const auto prompt = Prompt(9, static_cast<int>(V), 1);

  core::KvCache cache(direct->config(), 64 << 20);
  auto seq = cache.Allocate(static_cast<int64_t>(prompt.size()));
  ASSERT_TRUE(seq.ok());
  core::SeqInput in{*seq, prompt, true};
  std::vector<float> want;
  ASSERT_TRUE(direct->Forward({&in, 1}, cache, &want).ok());

  for (bool all : {true, false}) {
    v1::ForwardRequest req;
    for (int32_t t : prompt) req.add_tokens(t);
    req.set_all_positions(all);
    grpc::ClientContext ctx;
    v1::ForwardResponse resp;
    grpc::Status st = router->stub->Forward(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    const int64_t rows = all ? static_cast<int64_t>(prompt.size()) : 1;
    ASSERT_EQ(resp.rows(), rows);
    ASSERT_EQ(resp.vocab(), V);
    ASSERT_EQ(resp.logits().size(), rows * V * sizeof(float));
    std::vector<float> got(rows * V);
    std::memcpy(got.data(), resp.logits().data(), resp.logits().size());
    const float* ref = want.data() + (static_cast<int64_t>(prompt.size()) - rows) * V;
    // Same model, same batch shape, same kernels: equal up to float rounding
    // order.
    for (int64_t i = 0; i < rows * V; ++i) {
      ASSERT_NEAR(got[i], ref[i], 1e-6 * (1 + std::fabs(ref[i]))) << "all=" << all << " i=" << i;
    }
  }
  auto load = GetLoad(*router->stub);
  EXPECT_EQ(load.active_sequences(), 0u);
  // Idle: every whole block of --kv-cache-bytes is free.
  const size_t block_bytes = BytesPerToken(direct->config()) * core::KvCache::kDefaultBlockTokens;
  EXPECT_EQ(load.kv_cache_free_bytes(),
            SchedulerOptions{}.kv_cache_bytes / block_bytes * block_bytes);
}

TEST(RouterServer, GenerateGreedyEqualsDirectLoop) {
  const std::string dir = testing::MakeModel("tiny-v3", 4);
  auto router = StartRouter(dir, {});
  ASSERT_NE(router, nullptr);
  auto direct = LoadModel(dir);
  ASSERT_NE(direct, nullptr);
  const auto prompt = Prompt(6, static_cast<int>(direct->config().vocab_size), 2);
  const Generated want = DirectGenerate(*direct, prompt, 24);
  StreamResult got = RunStream(*router->stub, MakeRequest(prompt, 24));
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.finish, want.finish);
  EXPECT_EQ(got.prompt_tokens, prompt.size());
}

// A seed (0 included) gives the one-process sampled tokens every time; a
// request without one (absent, not 0) gets a random seed, so unseeded sampled
// requests differ from each other and from seed 0.
TEST(RouterServer, SeedIsHonouredAndAnAbsentSeedIsRandom) {
  const std::string dir = testing::MakeModel("tiny-v3", 4);
  auto router = StartRouter(dir, {});
  ASSERT_NE(router, nullptr);
  auto direct = LoadModel(dir);
  ASSERT_NE(direct, nullptr);
  const auto prompt = Prompt(6, static_cast<int>(direct->config().vocab_size), 3);
  constexpr int kTokens = 12;
  v1::GenerateRequest req = MakeRequest(prompt, kTokens);
  req.set_ignore_eos(true);
  req.mutable_sampling()->set_temperature(1.5f);
  core::SamplingParams sp;
  sp.temperature = 1.5;
  std::vector<int32_t> seed0;
  for (const uint64_t seed : {uint64_t{7}, uint64_t{0}}) {
    req.mutable_sampling()->set_seed(seed);
    sp.seed = seed;
    const Generated want = DirectGenerate(*direct, prompt, kTokens, sp, true);
    for (int i = 0; i < 2; ++i) {
      StreamResult got = RunStream(*router->stub, req);
      ASSERT_TRUE(got.status.ok()) << got.status.error_message();
      EXPECT_EQ(got.tokens, want.tokens) << "seed " << seed << " run " << i;
    }
    if (seed == 0) seed0 = want.tokens;
  }
  req.mutable_sampling()->clear_seed();
  std::vector<std::vector<int32_t>> unseeded;
  for (int i = 0; i < 3; ++i) {
    StreamResult got = RunStream(*router->stub, req);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    unseeded.push_back(got.tokens);
  }
  // 12 tokens at temperature 1.5 over 512 ids: equal only by (vanishing)
  // chance.
  EXPECT_NE(unseeded[0], unseeded[1]);
  EXPECT_NE(unseeded[1], unseeded[2]);
  for (const auto& u : unseeded) EXPECT_NE(u, seed0);
}

TEST(RouterServer, SixteenConcurrentStreamsEachEqualRunningAlone) {
  const std::string dir = testing::MakeModel("tiny-v3", 5);
  SchedulerOptions opts;
  opts.max_batch_tokens = 24;  // long prompts are prefilled in chunks, next to decodes
  auto router = StartRouter(dir, opts);
  ASSERT_NE(router, nullptr);
  auto direct = LoadModel(dir);
  ASSERT_NE(direct, nullptr);
  const int V = static_cast<int>(direct->config().vocab_size);

  constexpr int kStreams = 16;
  std::vector<v1::GenerateRequest> reqs(kStreams);
  std::vector<Generated> want(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    const auto prompt = Prompt(1 + (i * 7) % 45, V, 10 + i);
    const int max_tokens = 1 + (i * 5) % 29;
    core::SamplingParams sp;
    if (i % 4 == 3) {  // some sampled streams: same seed, same tokens
      sp.temperature = 0.8;
      sp.top_k = 40;
      sp.top_p = 0.9;
      sp.seed = 1000 + i;
    }
    reqs[i] = MakeRequest(prompt, max_tokens);
    reqs[i].set_ignore_eos(i % 2 == 0);
    reqs[i].mutable_sampling()->set_temperature(static_cast<float>(sp.temperature));
    reqs[i].mutable_sampling()->set_top_k(static_cast<uint32_t>(sp.top_k));
    reqs[i].mutable_sampling()->set_top_p(static_cast<float>(sp.top_p));
    reqs[i].mutable_sampling()->set_seed(sp.seed);
    // The reference takes the parameters as the router sees them (float on the
    // wire).
    sp.temperature = static_cast<float>(sp.temperature);
    sp.top_p = static_cast<float>(sp.top_p);
    want[i] = DirectGenerate(*direct, prompt, max_tokens, sp, reqs[i].ignore_eos());
  }
  std::vector<StreamResult> got(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] { got[i] = RunStream(*router->stub, reqs[i]); });
  }
  for (auto& t : threads) t.join();
  // Continuous batching happened: far fewer steps than sequences x positions.
  const SchedulerLoad stats = router->scheduler->GetLoad();
  int64_t alone_steps = 0;
  for (int i = 0; i < kStreams; ++i) {
    alone_steps +=
        (reqs[i].prompt_tokens_size() + opts.max_batch_tokens - 1) / opts.max_batch_tokens +
        static_cast<int64_t>(want[i].tokens.size()) - 1;
  }
  std::fprintf(stderr, "%llu steps of %llu tokens (%lld steps one stream at a time)\n",
               static_cast<unsigned long long>(stats.steps),
               static_cast<unsigned long long>(stats.step_tokens),
               static_cast<long long>(alone_steps));
  EXPECT_LT(stats.steps, static_cast<uint64_t>(alone_steps));
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(got[i].status.ok()) << i << ": " << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, want[i].tokens) << "stream " << i;
    EXPECT_EQ(got[i].finish, want[i].finish) << "stream " << i;
  }
  auto load = GetLoad(*router->stub);
  EXPECT_EQ(load.active_sequences(), 0u);
  EXPECT_EQ(load.queued_requests(), 0u);
  EXPECT_EQ(load.kv_cache_free_bytes(), UsableKvBytes(dir, opts));
}

TEST(RouterServer, ClientCancelFreesTheSequence) {
  const std::string dir = testing::MakeModel("tiny-v3", 6);
  auto control = std::make_shared<FaultControl>();
  control->SetDelay(2);  // ~4 ms per token: the stream is still running when cancelled
  SchedulerOptions opts;
  opts.kv_cache_bytes = 8 << 20;
  auto router = StartRouter(dir, opts, std::make_unique<FaultyExpertBackend>(control));
  ASSERT_NE(router, nullptr);
  auto req = MakeRequest(Prompt(5, 512, 1), 1000);
  req.set_ignore_eos(true);
  grpc::ClientContext ctx;
  StreamResult got = RunStream(*router->stub, req, &ctx, [&](int n) {
    if (n == 3) ctx.TryCancel();
  });
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_GE(got.tokens.size(), 3u);
  EXPECT_LT(got.tokens.size(), 1000u);
  const size_t usable = UsableKvBytes(dir, opts);
  EXPECT_TRUE(WaitForLoad(*router->stub, [&](const v1::RouterLoadResponse& l) {
    return l.active_sequences() == 0 && l.kv_cache_free_bytes() == usable;
  })) << "the cancelled sequence still holds its KV cache";

  // The router still serves.
  control->SetDelay(0);
  StreamResult next = RunStream(*router->stub, MakeRequest(Prompt(3, 512, 2), 4));
  EXPECT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_FALSE(next.tokens.empty());
}

TEST(RouterServer, BadRequestsAreInvalidArgument) {
  const std::string dir = testing::MakeModel("tiny-v3", 7);
  auto router = StartRouter(dir, {});
  ASSERT_NE(router, nullptr);
  auto expect_invalid = [&](v1::GenerateRequest req, const std::string& what) {
    StreamResult r = RunStream(*router->stub, req);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what;
    EXPECT_THAT(r.status.error_message(), HasSubstr(what));
    EXPECT_TRUE(r.tokens.empty());
  };
  expect_invalid(MakeRequest({}, 4), "prompt_tokens is empty");
  expect_invalid(MakeRequest({1, 2, 512}, 4),
                 "prompt_tokens[2] = 512 is outside the vocabulary [0, 512)");
  expect_invalid(MakeRequest({1, -3}, 4), "prompt_tokens[1] = -3");
  expect_invalid(MakeRequest({1, 2}, 0), "max_tokens must be at least 1");
  {
    auto req = MakeRequest({1, 2}, 4);
    req.mutable_sampling()->set_temperature(-1);
    expect_invalid(req, "temperature must be a finite number >= 0");
  }
  {
    auto req = MakeRequest({1, 2}, 4);
    req.mutable_sampling()->set_top_p(1.5);
    expect_invalid(req, "top_p must be in (0, 1]");
  }
  {
    v1::ForwardRequest req;
    grpc::ClientContext ctx;
    v1::ForwardResponse resp;
    grpc::Status st = router->stub->Forward(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("tokens is empty"));
  }
  {
    v1::ForwardRequest req;
    req.add_tokens(1000);
    grpc::ClientContext ctx;
    v1::ForwardResponse resp;
    grpc::Status st = router->stub->Forward(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("tokens[0] = 1000 is outside the vocabulary"));
  }
}

TEST(RouterServer, OverloadAndOversizedRequestsAreResourceExhausted) {
  const std::string dir = testing::MakeModel("tiny-v3", 8);
  auto direct = LoadModel(dir);
  ASSERT_NE(direct, nullptr);
  const size_t bpt = BytesPerToken(direct->config());
  auto control = std::make_shared<FaultControl>();
  SchedulerOptions opts;
  opts.kv_cache_bytes = 40 * bpt;             // one request of 34 tokens at a time
  opts.kv_block_tokens = 1;                   // token-exact sizes in the messages below
  opts.kv_admission = KvAdmission::kReserve;  // a request waits for the one before it
  opts.max_queue = 1;
  auto router = StartRouter(dir, opts, std::make_unique<FaultyExpertBackend>(control));
  ASSERT_NE(router, nullptr);

  // Never fits: 4 + 100 tokens over a 40-token budget.
  {
    StreamResult r = RunStream(*router->stub, MakeRequest(Prompt(4, 512, 1), 100));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(r.status.error_message(),
                HasSubstr(absl::StrCat("needs ", 104 * bpt, " bytes of KV cache")));
    EXPECT_THAT(r.status.error_message(),
                HasSubstr(absl::StrCat("budget of ", 40 * bpt, " bytes")));
  }

  control->Pause();
  const auto prompt_a = Prompt(4, 512, 2), prompt_b = Prompt(4, 512, 3);
  auto req_a = MakeRequest(prompt_a, 30), req_b = MakeRequest(prompt_b, 30);
  req_a.set_ignore_eos(true);
  req_b.set_ignore_eos(true);
  StreamResult got_a, got_b;
  std::thread a([&] { got_a = RunStream(*router->stub, req_a); });
  ASSERT_TRUE(control->WaitBlocked());  // A is admitted, its first step waits
  ASSERT_TRUE(WaitForLoad(*router->stub, [](const auto& l) { return l.active_sequences() == 1; }));
  std::thread b([&] { got_b = RunStream(*router->stub, req_b); });
  ASSERT_TRUE(WaitForLoad(*router->stub, [](const auto& l) { return l.queued_requests() == 1; }));

  StreamResult c = RunStream(*router->stub, MakeRequest(Prompt(2, 512, 4), 2));
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(c.status.error_message(), HasSubstr("router overloaded: 1 requests queued"));

  control->Resume();
  a.join();
  b.join();
  ASSERT_TRUE(got_a.status.ok()) << got_a.status.error_message();
  ASSERT_TRUE(got_b.status.ok()) << got_b.status.error_message();
  EXPECT_EQ(got_a.tokens, DirectGenerate(*direct, prompt_a, 30, {}, true).tokens);
  EXPECT_EQ(got_b.tokens, DirectGenerate(*direct, prompt_b, 30, {}, true).tokens);
  auto load = GetLoad(*router->stub);
  EXPECT_EQ(load.kv_cache_free_bytes(), UsableKvBytes(dir, opts));
}

TEST(RouterServer, ExpertFailureFailsOnlyTheSequencesOfThatStep) {
  const std::string dir = testing::MakeModel("tiny-v3", 9);
  auto direct = LoadModel(dir);
  ASSERT_NE(direct, nullptr);
  auto control = std::make_shared<FaultControl>();
  control->SetDelay(1);
  SchedulerOptions opts;
  opts.kv_cache_bytes = 4 << 20;
  auto router = StartRouter(dir, opts, std::make_unique<FaultyExpertBackend>(control));
  ASSERT_NE(router, nullptr);

  // A and B decode together in every step.
  std::atomic<int> a_tokens{0}, b_tokens{0};
  auto req_a = MakeRequest(Prompt(5, 512, 1), 2000), req_b = MakeRequest(Prompt(7, 512, 2), 2000);
  req_a.set_ignore_eos(true);
  req_b.set_ignore_eos(true);
  StreamResult got_a, got_b;
  std::thread a([&] {
    grpc::ClientContext ctx;
    got_a = RunStream(*router->stub, req_a, &ctx, [&](int n) { a_tokens = n; });
  });
  std::thread b([&] {
    grpc::ClientContext ctx;
    got_b = RunStream(*router->stub, req_b, &ctx, [&](int n) { b_tokens = n; });
  });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while ((a_tokens < 2 || b_tokens < 2) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_GE(a_tokens, 2);
  ASSERT_GE(b_tokens, 2);

  // C arrives while the step of A and B is stuck, then that step fails.
  control->Pause();
  ASSERT_TRUE(control->WaitBlocked());
  const auto prompt_c = Prompt(6, 512, 3);
  StreamResult got_c;
  std::thread c([&] { got_c = RunStream(*router->stub, MakeRequest(prompt_c, 12)); });
  ASSERT_TRUE(WaitForLoad(*router->stub, [](const auto& l) { return l.queued_requests() == 1; }));
  control->FailNext(1);
  control->Resume();
  a.join();
  b.join();
  c.join();
  for (const StreamResult* r : {&got_a, &got_b}) {
    EXPECT_EQ(r->status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(r->status.error_message(), HasSubstr("injected failure"));
    EXPECT_LT(r->tokens.size(), 2000u);
  }
  ASSERT_TRUE(got_c.status.ok()) << got_c.status.error_message();
  EXPECT_EQ(got_c.tokens, DirectGenerate(*direct, prompt_c, 12).tokens);

  // A later request succeeds; every byte of the cache is free again.
  control->SetDelay(0);
  const auto prompt_d = Prompt(4, 512, 4);
  StreamResult got_d = RunStream(*router->stub, MakeRequest(prompt_d, 8));
  ASSERT_TRUE(got_d.status.ok()) << got_d.status.error_message();
  EXPECT_EQ(got_d.tokens, DirectGenerate(*direct, prompt_d, 8).tokens);
  auto load = GetLoad(*router->stub);
  EXPECT_EQ(load.active_sequences(), 0u);
  EXPECT_EQ(load.kv_cache_free_bytes(), UsableKvBytes(dir, opts));
}

// An expert failure that names its tokens ends only their sequences; the
// others in the same step run again and finish with the right tokens.
TEST(RouterServer, ExpertFailureOfSomeTokensFailsOnlyTheirSequences) {
  const std::string dir = testing::MakeModel("tiny-v3", 9);
  auto direct = LoadModel(dir);
  ASSERT_NE(direct, nullptr);
  auto control = std::make_shared<FaultControl>();
  control->SetDelay(1);
  SchedulerOptions opts;
  opts.kv_cache_bytes = 4 << 20;
  auto router = StartRouter(dir, opts, std::make_unique<FaultyExpertBackend>(control));
  ASSERT_NE(router, nullptr);
  const auto prompt_a = Prompt(5, 512, 1), prompt_b = Prompt(7, 512, 2);
  auto req_a = MakeRequest(prompt_a, 30), req_b = MakeRequest(prompt_b, 30);
  req_a.set_ignore_eos(true);
  req_b.set_ignore_eos(true);
  std::atomic<int> a_tokens{0}, b_tokens{0};
  StreamResult got_a, got_b;
  std::thread a([&] {
    grpc::ClientContext ctx;
    got_a = RunStream(*router->stub, req_a, &ctx, [&](int n) { a_tokens = n; });
  });
  std::thread b([&] {
    grpc::ClientContext ctx;
    got_b = RunStream(*router->stub, req_b, &ctx, [&](int n) { b_tokens = n; });
  });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while ((a_tokens < 2 || b_tokens < 2) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  control->FailFirstTokenNext(1);
  a.join();
  b.join();
  const bool a_failed = !got_a.status.ok();
  EXPECT_NE(a_failed, !got_b.status.ok()) << "exactly one of the two fails";
  const StreamResult& failed = a_failed ? got_a : got_b;
  const StreamResult& ok = a_failed ? got_b : got_a;
  EXPECT_EQ(failed.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(failed.status.error_message(), HasSubstr("injected failure of token 0"));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens, DirectGenerate(*direct, a_failed ? prompt_b : prompt_a, 30).tokens);
  auto load = GetLoad(*router->stub);
  EXPECT_EQ(load.active_sequences(), 0u);
  EXPECT_EQ(load.kv_cache_free_bytes(), UsableKvBytes(dir, opts));
}

TEST(RouterServer, ShutdownEndsStreamsWithUnavailable) {
  const std::string dir = testing::MakeModel("tiny-v3", 10);
  auto control = std::make_shared<FaultControl>();
  auto router = StartRouter(dir, {}, std::make_unique<FaultyExpertBackend>(control));
  ASSERT_NE(router, nullptr);
  control->Pause();
  StreamResult got;
  std::thread t([&] { got = RunStream(*router->stub, MakeRequest(Prompt(3, 512, 1), 50)); });
  ASSERT_TRUE(control->WaitBlocked());
  std::thread stopper([&] { router->scheduler->Shutdown(absl::Milliseconds(50)); });
  // The scheduler waits for the blocked step after the grace period.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  control->Resume();
  stopper.join();
  t.join();
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(got.status.error_message(), HasSubstr("shutting down"));
  StreamResult after = RunStream(*router->stub, MakeRequest(Prompt(3, 512, 1), 5));
  EXPECT_EQ(after.status.error_code(), grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace dmoe::router
