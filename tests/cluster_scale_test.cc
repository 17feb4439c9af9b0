// Scale-out and scale-in with real processes under load: a router running the
// placement controller over 3 dmoe-expert servers (exact mode). A fourth
// server started with --join receives slots while streams run; then SIGTERM
// on one of the first three makes it report "leaving", the controller moves
// its slots, and it exits cleanly. No request fails and every stream gets the
// one-process model's tokens. `dmoe ctl` is used against the same router.
#include <atomic>
#include <cstdio>
#include <fstream>
#include <thread>

#include "dmoe/v1/expert.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::BinDir;
using testing::ChildProcess;
using testing::Cluster;
using testing::LocalGreedy;

v1::PlacementResponse Placement(int router_port) {
  auto stub = v1::RouterService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(router_port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::PlacementResponse r;
  EXPECT_TRUE(stub->GetPlacement(&ctx, v1::PlacementRequest(), &r).ok());
  return r;
}

v1::ServerStatusResponse Status(int port) {
  auto stub = v1::ExpertService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ServerStatusResponse r;
  EXPECT_TRUE(stub->GetStatus(&ctx, v1::ServerStatusRequest(), &r).ok());
  return r;
}

int64_t Slots(const v1::ServerStatusResponse& s) {
  int64_t n = 0;
  for (const auto& l : s.slots()) n += l.experts_size();
  return n;
}

// Runs `dmoe ctl ARGS`; returns (exit code, stdout).
std::pair<int, std::string> Ctl(const std::string& args) {
  const std::string cmd = BinDir() + "/dmoe ctl " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(ClusterScale, ServerJoinsAndAnotherLeavesUnderLoadWithoutFailures) {
  const std::string model = testing::MakeModel("tiny-v3", 35);
  const std::string dir = testing::FreshDir("cluster_scale");
  constexpr int kThreads = 3, kPrompts = 3, kTokens = 8;
  std::vector<std::vector<int32_t>> prompts, want;
  for (int i = 0; i < kThreads * kPrompts; ++i) {
    std::vector<int32_t> p = {9 + i, 17, 3, 99, 250, 7, 42, 11};
    p.resize(3 + i % 6);
    prompts.push_back(p);
    want.push_back(LocalGreedy(model, p, kTokens));
  }
  Cluster c;
  c.set_expert_extra({"--leave-timeout-s", "30"});
  ASSERT_TRUE(c.Start(model, 3, dir, {"--controller", "--rebalance", "manual", "--slots-per-server", "6"}));
  const std::string router = "127.0.0.1:" + std::to_string(c.router_port());

  // dmoe ctl against the live router.
  auto [code, out] = Ctl("placement --json --router " + router);
  ASSERT_EQ(code, 0) << out;
  nlohmann::json pj = nlohmann::json::parse(out, nullptr, false);
  ASSERT_TRUE(pj.is_object()) << out;
  EXPECT_EQ(pj["version"], 1);
  EXPECT_EQ(pj["servers"].size(), 3u);
  std::tie(code, out) = Ctl("rebalance --dry-run --json --router " + router);
  ASSERT_EQ(code, 0) << out;
  pj = nlohmann::json::parse(out, nullptr, false);
  EXPECT_EQ(pj["applied"], false) << out;
  std::tie(code, out) = Ctl("bogus --router " + router);
  EXPECT_EQ(code, 2) << out;

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
    for (int i = 0; i < 6000 && done < n; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  };
  wait_done(kThreads * 2);

  // Scale-out: a fourth server joins by itself.
  ChildProcess joiner;
  ASSERT_TRUE(joiner.Start({BinDir() + "/dmoe-expert", "--model", model, "--join", router, "--dtype",
                            "f32", "--threads", "1", "--port", "0", "--metrics-port", "0",
                            "--leave-timeout-s", "2",
                            "--port-file", dir + "/expert3.port"},
                           dir + "/expert3.log"));
  const int joined_port = testing::WaitForPortFile(dir + "/expert3.port", joiner);
  ASSERT_NE(joined_port, 0) << joiner.Log();
  v1::PlacementResponse p;
  for (int i = 0; i < 600; ++i) {
    p = Placement(c.router_port());
    if (p.server_addresses_size() == 4) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(p.server_addresses_size(), 4) << c.router().Log() << joiner.Log();
  EXPECT_GE(p.version(), 2u);
  EXPECT_GT(Slots(Status(joined_port)), 0) << joiner.Log();
  const int at_join = done;
  wait_done(at_join + kThreads * 2);
  uint64_t computed = 0;
  for (uint64_t n : Status(joined_port).tokens_computed()) computed += n;
  EXPECT_GT(computed, 0u) << "the new server gets work";

  // Scale-in: SIGTERM on server 1; its slots move before it drains.
  ASSERT_GT(Slots(Status(c.expert_port(1))), 0);
  ::kill(c.expert(1).pid(), SIGTERM);
  EXPECT_EQ(c.expert(1).Wait(std::chrono::seconds(60)), 0) << c.expert(1).Log();
  EXPECT_NE(c.expert(1).Log().find("slots moved away"), std::string::npos) << c.expert(1).Log();
  const int at_leave = done;
  wait_done(at_leave + kThreads * 2);
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_GE(done, at_leave + kThreads * 2);
  p = Placement(c.router_port());
  nlohmann::json placement = nlohmann::json::parse(p.placement_json());
  for (const auto& layer : placement["layers"]) EXPECT_TRUE(layer["servers"][1].empty()) << p.placement_json();
  const std::string log = c.router().Log();
  EXPECT_NE(log.find("applied (server-joined)"), std::string::npos) << log;
  EXPECT_NE(log.find("applied (server-leaving)"), std::string::npos) << log;

  std::tie(code, out) = Ctl("load --router " + router);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("heatmap"), std::string::npos) << out;
  // The others cannot take its slots (2 x 6 < 16): it leaves at its timeout.
  EXPECT_EQ(joiner.Kill(SIGTERM), 0) << joiner.Log();
  EXPECT_NE(joiner.Log().find("leave timeout"), std::string::npos) << joiner.Log();
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
}

}  // namespace
}  // namespace dmoe
