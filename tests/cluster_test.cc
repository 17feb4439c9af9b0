// The disaggregated system as real processes on loopback: 3 dmoe-expert servers
// and a dmoe-router, checked against the one-process model (exact mode).
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <thread>

#include "core/model.h"
#include "core/sampler.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::Cluster;
using testing::LocalGreedy;
using testing::LocalLogits;
using testing::RelL2;

const std::vector<int32_t> kPrompt = {5, 17, 3, 99, 250, 7, 42, 11};

void ExpectExactEquivalence(const std::string& preset, const std::vector<std::string>& router_extra,
                            const std::string& placement_json = "") {
  const std::string model = testing::MakeModel(preset, 31);
  const std::string dir = testing::FreshDir("cluster");
  std::string placement;
  if (!placement_json.empty()) {
    placement = dir + "/placement.json";
    std::ofstream(placement) << placement_json;
  }
  Cluster c;
  ASSERT_TRUE(c.Start(model, 3, dir, router_extra, placement));
  auto remote = c.Forward(kPrompt);
  ASSERT_TRUE(remote.ok()) << remote.status() << "\n" << c.router().Log();
  const auto local = LocalLogits(model, kPrompt);
  ASSERT_EQ(remote->size(), local.size());
  // Exact mode on both sides, and the router adds each token's per-expert
  // rows in the one-process order (per-assignment replies, f32 wire): the
  // same bits, whatever the split over servers and replicas.
  EXPECT_EQ(0, std::memcmp(remote->data(), local.data(), local.size() * sizeof(float)))
      << "rel L2 " << RelL2(*remote, local);
  auto tokens = c.Generate(kPrompt, 8);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(*tokens, LocalGreedy(model, kPrompt, 8));
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(c.expert(i).Kill(SIGTERM), 0) << c.expert(i).Log();
}

TEST(Cluster, ExactModeEqualsOneProcess_SharedOnExperts) { ExpectExactEquivalence("tiny-v3", {}); }

TEST(Cluster, ExactModeEqualsOneProcess_SharedOnRouter) {
  ExpectExactEquivalence("tiny-v2lite", {"--shared-expert", "router"});
}

TEST(Cluster, ExactModeEqualsOneProcess_WithReplicas) {
  // tiny-v3: 16 experts, MoE layers 1 and 2; experts 0-3 replicated.
  const std::string layer = R"([[0,1,2,3,4,5], [0,1,2,3,6,7,8,9,10], [0,1,2,3,11,12,13,14,15]])";
  ExpectExactEquivalence(
      "tiny-v3", {},
      std::string(R"({"version": 1, "num_servers": 3, "layers": [{"layer": 1, "servers": )") +
          layer + R"(}, {"layer": 2, "servers": )" + layer + "}]}");
}

// Narrower wire types trade accuracy for bytes: bf16 rounds each activation to
// 8 mantissa bits, fp8 e4m3 (per-token scale) to 3; the logits stay close to
// the exact ones and, being rounded, are not identical to them.
TEST(Cluster, NarrowWireDtypesStayCloseToExact) {
  const std::string model = testing::MakeModel("tiny-v3", 34);
  const auto local = LocalLogits(model, kPrompt);
  for (const auto& [wire, tol] : {std::pair<std::string, double>{"bf16", 2e-2}, {"fp8", 1.5e-1}}) {
    const std::string dir = testing::FreshDir("cluster_" + wire);
    Cluster c;
    ASSERT_TRUE(c.Start(model, 2, dir, {"--wire-dtype", wire}));
    auto remote = c.Forward(kPrompt);
    ASSERT_TRUE(remote.ok()) << wire << ": " << remote.status();
    const double err = RelL2(*remote, local);
    std::fprintf(stderr, "wire %s: logits rel L2 error %.3g (tolerance %.2g)\n", wire.c_str(), err,
                 tol);
    EXPECT_LT(err, tol) << wire;
    EXPECT_GT(err, 0.0) << wire;
  }
}

TEST(Cluster, SixtyFourConcurrentStreamsGetTheirOwnTokens) {
  const std::string model = testing::MakeModel("tiny-v3", 33);
  const std::string dir = testing::FreshDir("cluster");
  Cluster c;
  ASSERT_TRUE(c.Start(model, 3, dir, {"--max-batch-tokens", "64"}));
  constexpr int kStreams = 64;
  std::vector<std::vector<int32_t>> prompts(kStreams);
  std::vector<int> lengths(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    for (int j = 0; j < 1 + i % 7; ++j) prompts[i].push_back((i * 37 + j * 11) % 512);
    lengths[i] = 1 + (i * 5) % 9;
  }
  std::vector<absl::StatusOr<std::vector<int32_t>>> got(kStreams, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] { got[i] = c.Generate(prompts[i], lengths[i]); });
  }
  for (auto& t : threads) t.join();
  // Each stream's tokens equal the one-process greedy continuation of its prompt.
  core::ModelOptions o;
  o.compute = core::ComputeType::kF32;
  auto m = core::Model::Load(model, std::move(o));
  ASSERT_TRUE(m.ok());
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(got[i].ok()) << i << ": " << got[i].status();
    core::KvCache cache((*m)->config(), 1 << 22);
    const int32_t s = *cache.Allocate(static_cast<int64_t>(prompts[i].size()) + lengths[i]);
    std::vector<int32_t> step = prompts[i], want;
    std::vector<float> logits;
    for (int k = 0; k < lengths[i]; ++k) {
      core::SeqInput in{s, step, false};
      ASSERT_TRUE((*m)->Forward({&in, 1}, cache, &logits).ok());
      want.push_back(core::ArgMax(logits));
      step = {want.back()};
    }
    EXPECT_EQ(*got[i], want) << "stream " << i;
  }
}

// Every expert on two of the three servers; expert server 1 is killed (-9)
// while streams keep coming: its tokens go to the replicas and no request
// fails, each with the one-process greedy tokens.
TEST(Cluster, KilledServerWithReplicasFailsNoRequest) {
  const std::string model = testing::MakeModel("tiny-v3", 33);
  const std::string dir = testing::FreshDir("cluster");
  std::vector<std::vector<int32_t>> servers(3);
  for (int e = 0; e < 16; ++e) {
    servers[e % 3].push_back(e);
    servers[(e + 1) % 3].push_back(e);
  }
  nlohmann::json layer = servers;
  const std::string placement = dir + "/placement.json";
  std::ofstream(placement) << nlohmann::json{
      {"version", 1},
      {"num_servers", 3},
      {"layers",
       {{{"layer", 1}, {"servers", layer}},
        {{"layer", 2},
         {"servers", layer}}}}}.dump();
  constexpr int kThreads = 4, kPrompts = 3, kTokens = 12;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<int32_t>> want;
  for (int i = 0; i < kThreads * kPrompts; ++i) {
    std::vector<int32_t> p = kPrompt;
    p[0] = 1 + i;
    p.resize(4 + i % 5);
    prompts.push_back(p);
    want.push_back(LocalGreedy(model, p, kTokens));
  }
  Cluster c;
  ASSERT_TRUE(c.Start(model, 3, dir, {"--expert-deadline-ms", "3000"}, placement));
  std::atomic<bool> stop{false};
  std::atomic<int> done{0}, failed{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < kThreads; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; !stop; i = (i + 1) % kPrompts) {
        const int p = k * kPrompts + i;
        auto got = c.Generate(prompts[p], kTokens);
        if (!got.ok()) {
          ADD_FAILURE() << "stream " << p << ": " << got.status();
          ++failed;
        } else {
          EXPECT_EQ(*got, want[p]) << "stream " << p;
        }
        ++done;
      }
    });
  }
  auto wait_done = [&](int n) {
    for (int i = 0; i < 3000 && done < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  };
  wait_done(kThreads * 2);
  c.expert(1).Kill(SIGKILL);
  const int at_kill = done;
  wait_done(at_kill + kThreads * 3);
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_GE(done, at_kill + kThreads * 3) << "requests after the kill";
  EXPECT_NE(c.router().Log().find("re-sent to replicas"), std::string::npos) << c.router().Log();
  auto logits = c.Forward(kPrompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  // Served by the surviving replicas: still the one-process bits.
  const auto local = LocalLogits(model, kPrompt);
  ASSERT_EQ(logits->size(), local.size());
  EXPECT_EQ(0, std::memcmp(logits->data(), local.data(), local.size() * sizeof(float)))
      << "rel L2 " << RelL2(*logits, local);
}

TEST(Cluster, LostServerFailsOnlyAffectedRequestsAndRecovers) {
  const std::string model = testing::MakeModel("tiny-v3", 32);
  const std::string dir = testing::FreshDir("cluster");
  Cluster c;
  ASSERT_TRUE(c.Start(model, 3, dir, {"--expert-deadline-ms", "3000"}));
  ASSERT_TRUE(c.Forward(kPrompt).ok());
  c.expert(1).Kill(SIGKILL);
  auto r = c.Forward(kPrompt);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().code() == absl::StatusCode::kUnavailable ||
              r.status().code() == absl::StatusCode::kDeadlineExceeded)
      << r.status();
  EXPECT_NE(r.status().message().find("expert server 1"), std::string::npos) << r.status();
  EXPECT_TRUE(c.router().Running());
  ASSERT_TRUE(c.StartExpert(1));  // back on the same port
  auto again = c.Forward(kPrompt);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_LE(RelL2(*again, LocalLogits(model, kPrompt)), 1e-6);
}

// `--experts none`, as dmoe-router --help describes it: no expert servers, the
// router computes every expert itself and gives the one-process tokens. "none"
// among addresses is a usage error.
TEST(Cluster, RouterWithExpertsNoneComputesInProcess) {
  const std::string model = testing::MakeModel("tiny-v3", 35);
  const std::string dir = testing::FreshDir("router");
  testing::ChildProcess router;
  ASSERT_TRUE(router.Start(
      {testing::BinDir() + "/dmoe-router", "--model", model, "--experts", "none", "--dtype", "f32",
       "--threads", "1", "--port", "0", "--metrics-port", "0", "--port-file", dir + "/router.port"},
      dir + "/router.log"));
  const int port = testing::WaitForPortFile(dir + "/router.port", router);
  ASSERT_NE(port, 0) << router.Log();
  auto stub = v1::RouterService::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  for (int32_t t : kPrompt) req.add_prompt_tokens(t);
  req.set_max_tokens(8);
  req.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::vector<int32_t> tokens;
  while (reader->Read(&resp)) tokens.push_back(resp.token());
  const grpc::Status st = reader->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message() << "\n" << router.Log();
  EXPECT_EQ(tokens, LocalGreedy(model, kPrompt, 8));
  EXPECT_EQ(router.Kill(SIGTERM), 0) << router.Log();

  testing::ChildProcess mixed;
  ASSERT_TRUE(mixed.Start({testing::BinDir() + "/dmoe-router", "--model", model, "--experts",
                           "none,127.0.0.1:50061", "--port", "0"},
                          dir + "/mixed.log"));
  EXPECT_EQ(mixed.Wait(std::chrono::seconds(30)), 2) << mixed.Log();
  EXPECT_NE(mixed.Log().find("'none' (compute the experts in-process) cannot be combined"),
            std::string::npos)
      << mixed.Log();
}

}  // namespace
}  // namespace dmoe
