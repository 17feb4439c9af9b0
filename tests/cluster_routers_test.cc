// Two routers over the same 3 expert servers: router A runs the placement
// controller, router B follows it (--controller-router). A re-placement
// requested while both serve streams switches both routers before old slots
// are unloaded: no request fails on either, and every stream gets the
// one-process model's tokens.
#include <atomic>
#include <cstdio>
#include <thread>

#include "common/grpc_status.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::BinDir;
using testing::ChildProcess;
using testing::Cluster;
using testing::LocalGreedy;

absl::StatusOr<std::vector<int32_t>> Generate(v1::RouterService::Stub& stub,
                                              const std::vector<int32_t>& prompt, int n) {
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.add_prompt_tokens(t);
  req.set_max_tokens(n);
  req.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::vector<int32_t> out;
  while (reader->Read(&resp)) out.push_back(resp.token());
  grpc::Status st = reader->Finish();
  if (!st.ok()) return common::FromGrpc(st);
  return out;
}

TEST(ClusterRouters, FollowerRouterSwitchesWithTheControllerAndNothingFails) {
  const std::string model = testing::MakeModel("tiny-v3", 36);
  const std::string dir = testing::FreshDir("cluster_routers");
  constexpr int kPrompts = 4, kTokens = 8;
  std::vector<std::vector<int32_t>> prompts, want;
  for (int i = 0; i < kPrompts; ++i) {
    std::vector<int32_t> p = {21 + i, 17, 3, 99, 250, 7};
    prompts.push_back(p);
    want.push_back(LocalGreedy(model, p, kTokens));
  }
  Cluster c;
  ASSERT_TRUE(
      c.Start(model, 3, dir, {"--controller", "--rebalance", "manual", "--slots-per-server", "7"}));
  const std::string router_a = "127.0.0.1:" + std::to_string(c.router_port());
  ChildProcess b;
  ASSERT_TRUE(b.Start({BinDir() + "/dmoe-router", "--model", model, "--controller-router", router_a,
                       "--dtype", "f32", "--threads", "1", "--port", "0", "--metrics-port", "0",
                       "--port-file", dir + "/router_b.port"},
                      dir + "/router_b.log"));
  const int port_b = testing::WaitForPortFile(dir + "/router_b.port", b);
  ASSERT_NE(port_b, 0) << b.Log();
  for (int i = 0; i < 100 && c.router().Log().find("follows this one") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_NE(c.router().Log().find("follows this one"), std::string::npos) << c.router().Log();
  auto stub_b = v1::RouterService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(port_b), grpc::InsecureChannelCredentials()));

  std::atomic<bool> stop{false};
  std::atomic<int> done{0}, failed{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < 2; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; !stop; i = (i + 1) % kPrompts) {
        auto got =
            k == 0 ? c.Generate(prompts[i], kTokens) : Generate(*stub_b, prompts[i], kTokens);
        if (!got.ok()) {
          ADD_FAILURE() << "router " << (k == 0 ? "A" : "B") << ": " << got.status();
          ++failed;
        } else {
          EXPECT_EQ(*got, want[i]) << "router " << (k == 0 ? "A" : "B") << " prompt " << i;
        }
        ++done;
      }
    });
  }
  auto wait_done = [&](int n) {
    for (int i = 0; i < 6000 && done < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  };
  wait_done(4);
  const std::string cmd = BinDir() + "/dmoe ctl rebalance --json --router " + router_a + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  EXPECT_EQ(pclose(p), 0) << out;
  EXPECT_NE(out.find("\"applied\":true"), std::string::npos) << out;
  const int at_switch = done;
  wait_done(at_switch + 6);
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_NE(b.Log().find("switched to placement version 2"), std::string::npos) << b.Log();
  EXPECT_EQ(b.Kill(SIGTERM), 0) << b.Log();
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
}

}  // namespace
}  // namespace dmoe
