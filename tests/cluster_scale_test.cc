// Scale-out and scale-in with real processes under load: a router running the
// placement controller over 3 dmoe-expert servers (exact mode). A fourth
// server started with --join receives slots while streams run; then SIGTERM
// on one of the first three makes it report "leaving", the controller moves
// its slots, and it exits cleanly. No request fails and every stream gets the
// one-process model's tokens. `dmoe ctl` is used against the same router.
// Then scale-in as issue 13.3 reported it (a leave with the default slot
// count; a leave the others cannot absorb), and honest health: the router is
// not ready while an expert has no live server.
#include <atomic>
#include <cstdio>
#include <fstream>
#include <set>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
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
  auto stub = v1::ExpertService::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
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
  ASSERT_TRUE(
      c.Start(model, 3, dir, {"--controller", "--rebalance", "manual", "--slots-per-server", "6"}));
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
    for (int i = 0; i < 6000 && done < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  };
  wait_done(kThreads * 2);

  // Scale-out: a fourth server joins by itself.
  ChildProcess joiner;
  ASSERT_TRUE(joiner.Start({BinDir() + "/dmoe-expert", "--model", model, "--join", router,
                            "--dtype", "f32", "--threads", "1", "--port", "0", "--metrics-port",
                            "0", "--leave-timeout-s", "2", "--port-file", dir + "/expert3.port"},
                           dir + "/expert3.log"));
  const int joined_port = testing::WaitForPortFile(dir + "/expert3.port", joiner);
  ASSERT_NE(joined_port, 0) << joiner.Log();
  v1::PlacementResponse p;
  for (int i = 0; i < 600; ++i) {
    p = Placement(c.router_port());
    // placement() and servers() are read one after the other: wait for both.
    if (p.server_addresses_size() == 4 && p.version() >= 2) break;
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
  for (const auto& layer : placement["layers"])
    EXPECT_TRUE(layer["servers"][1].empty()) << p.placement_json();
  const std::string log = c.router().Log();
  EXPECT_NE(log.find("applied (server-joined)"), std::string::npos) << log;
  EXPECT_NE(log.find("applied (server-leaving)"), std::string::npos) << log;

  std::tie(code, out) = Ctl("load --router " + router);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("heatmap"), std::string::npos) << out;
  // The others cannot take its slots (2 x 6 < 16): the leave is refused and
  // the server stays past its 2 s timeout, until a second SIGTERM forces it.
  ::kill(joiner.pid(), SIGTERM);
  for (int i = 0; i < 400 && joiner.Log().find("leave refused") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_NE(joiner.Log().find("leave refused"), std::string::npos) << joiner.Log();
  EXPECT_EQ(joiner.Kill(SIGTERM), 0) << joiner.Log();
  EXPECT_NE(joiner.Log().find("leave interrupted"), std::string::npos) << joiner.Log();
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
}

// grpc.health.v1.Health/Check of `service` at 127.0.0.1:port, without
// generated code (as deploy/docker/grpc_health_probe.cc): 1 SERVING,
// 2 NOT_SERVING, -1 when the call fails.
int HealthStatus(int port, const std::string& service) {
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  std::string req;
  if (!service.empty()) req = std::string("\x0a") + static_cast<char>(service.size()) + service;
  grpc::Slice slice(req);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status st;
  call->Finish(&response, &st, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  if (!cq.Next(&tag, &ok) || !ok || !st.ok()) return -1;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return -1;
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes.size() == 2 && bytes[0] == 0x08 ? bytes[1] : 0;
}

// Streams through the router on `threads` threads until `stop`; counts.
struct Load {
  Load(Cluster& c, int threads) {
    for (int k = 0; k < threads; ++k) {
      workers.emplace_back([this, &c, k] {
        while (!stop) {
          auto got = c.Generate({9 + k, 17, 3, 99}, 4);
          if (got.ok()) {
            ++done;
          } else {
            ++failed;
            absl::MutexLock lock(&mu);
            last_error = got.status().ToString();
          }
        }
      });
    }
  }
  ~Load() { Stop(); }
  void Stop() {
    stop = true;
    for (auto& t : workers) t.join();
    workers.clear();
  }
  void WaitDone(int n) {
    for (int i = 0; i < 6000 && done < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> done{0}, failed{0};
  absl::Mutex mu;
  std::string last_error;
  std::vector<std::thread> workers;
};

// Every routed expert of every layer has a server in the router's placement
// other than `gone`.
void ExpectEveryExpertHosted(int router_port, int gone, int num_experts) {
  const v1::PlacementResponse p = Placement(router_port);
  const nlohmann::json j = nlohmann::json::parse(p.placement_json());
  for (const auto& layer : j["layers"]) {
    std::set<int> hosted;
    for (size_t s = 0; s < layer["servers"].size(); ++s) {
      if (static_cast<int>(s) == gone) continue;
      for (int e : layer["servers"][s]) hosted.insert(e);
    }
    EXPECT_EQ(static_cast<int>(hosted.size()), num_experts) << p.placement_json();
  }
}

// Issue 13.3, as reported: 3 tiny-v3 servers (16 experts, top-4) with
// --leave-timeout-s 20 and a controller with its default slot count; SIGTERM
// on one server. Before: 2 x 6 slots cannot hold 16 experts, the server left
// at its timeout and every request failed. Now the default (8 slots) absorbs
// the leave: it exits once its slots moved, and no request fails.
TEST(ClusterScale, LeaveWithTheDefaultSlotCountIsAbsorbedWithoutAnOutage) {
  const std::string model = testing::MakeModel("tiny-v3", 35);
  const std::string dir = testing::FreshDir("cluster_scale_default_slots");
  Cluster c;
  c.set_expert_extra({"--leave-timeout-s", "20"});
  ASSERT_TRUE(c.Start(model, 3, dir, {"--controller", "--rebalance", "manual"}));
  ASSERT_TRUE(c.StartGateway());
  Load load(c, 2);
  load.WaitDone(4);
  ::kill(c.expert(1).pid(), SIGTERM);
  EXPECT_EQ(c.expert(1).Wait(std::chrono::seconds(60)), 0) << c.expert(1).Log();
  EXPECT_NE(c.expert(1).Log().find("slots moved away"), std::string::npos)
      << c.expert(1).Log() << c.router().Log();
  const int at_leave = load.done;
  load.WaitDone(at_leave + 4);
  load.Stop();
  EXPECT_EQ(load.failed, 0) << load.last_error << c.router().Log();
  EXPECT_GE(load.done, at_leave + 4);
  ExpectEveryExpertHosted(c.router_port(), 1, 16);
  EXPECT_EQ(c.HttpGet("/health").status, 200);
  EXPECT_NE(c.router().Log().find("8 slots per server"), std::string::npos) << c.router().Log();
}

// A leave the others cannot absorb (explicit 6 slots: 2 x 6 < 16) is refused:
// the server stays past its leave timeout and keeps serving; requests keep
// succeeding; a second SIGTERM forces it out.
TEST(ClusterScale, LeaveThatCannotBeAbsorbedIsRefusedAndTheServerKeepsServing) {
  const std::string model = testing::MakeModel("tiny-v3", 35);
  const std::string dir = testing::FreshDir("cluster_scale_refused");
  Cluster c;
  c.set_expert_extra({"--leave-timeout-s", "2"});
  ASSERT_TRUE(
      c.Start(model, 3, dir,
              {"--controller", "--rebalance", "manual", "--slots-per-server", "6", "--metrics-port",
               "0", "--metrics-port-file", dir + "/router.metrics.port"}));
  const int metrics_port = testing::WaitForPortFile(dir + "/router.metrics.port", c.router());
  ASSERT_NE(metrics_port, 0);
  EXPECT_NE(testing::HttpRequest(metrics_port, "GET", "/metrics")
                .body.find("\nmoe_router_leaves_refused_total 0"),
            std::string::npos);
  Load load(c, 2);
  load.WaitDone(4);
  ::kill(c.expert(1).pid(), SIGTERM);
  for (int i = 0; i < 400 && c.expert(1).Log().find("leave refused") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_NE(c.expert(1).Log().find("leave refused by the placement controller"), std::string::npos)
      << c.expert(1).Log();
  EXPECT_NE(c.expert(1).Log().find("only copy of"), std::string::npos) << c.expert(1).Log();
  std::this_thread::sleep_for(std::chrono::seconds(3));  // past its 2 s leave timeout
  EXPECT_EQ(c.expert(1).Log().find("draining"), std::string::npos) << c.expert(1).Log();
  const int at_refusal = load.done;
  load.WaitDone(at_refusal + 4);
  EXPECT_EQ(load.failed, 0) << load.last_error;
  EXPECT_GE(load.done, at_refusal + 4);
  ExpectEveryExpertHosted(c.router_port(), -1, 16);
  const std::string log = c.router().Log();
  EXPECT_NE(log.find("refusing the leave of expert server 1"), std::string::npos) << log;
  EXPECT_EQ(log.find("could not move the slots"), std::string::npos) << log;
  const std::string metrics = testing::HttpRequest(metrics_port, "GET", "/metrics").body;
  EXPECT_NE(metrics.find("\nmoe_router_leaves_refused_total 1"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\nmoe_router_ready 1"), std::string::npos) << metrics;
  load.Stop();
  EXPECT_EQ(c.expert(1).Kill(SIGTERM), 0) << c.expert(1).Log();
  EXPECT_NE(c.expert(1).Log().find("leave interrupted"), std::string::npos) << c.expert(1).Log();
}

// Honest health (issue 13.3): with the only server of experts 5-9 killed, the
// router is not ready (GetLoad UNAVAILABLE naming the expert) and the
// gateway's /health is 503; both recover when the server returns.
TEST(ClusterHealth, NotReadyWhileAnExpertHasNoServerAndReadyWhenItReturns) {
  const std::string model = testing::MakeModel("tiny-v3", 35);
  const std::string dir = testing::FreshDir("cluster_health");
  Cluster c;
  ASSERT_TRUE(c.Start(model, 3, dir));
  ASSERT_TRUE(c.StartGateway());
  ASSERT_TRUE(c.Generate({9, 17, 3}, 2).ok());
  auto stub = v1::RouterService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(c.router_port()), grpc::InsecureChannelCredentials()));
  auto get_load = [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::RouterLoadResponse r;
    return stub->GetLoad(&ctx, v1::RouterLoadRequest(), &r);
  };
  EXPECT_TRUE(get_load().ok());
  // Readiness (the k8s readinessProbe's service) and liveness ("").
  EXPECT_EQ(HealthStatus(c.router_port(), "dmoe.v1.RouterService"), 1);
  EXPECT_EQ(HealthStatus(c.router_port(), ""), 1);

  ASSERT_EQ(c.expert(1).Kill(SIGKILL), -1);
  testing::HttpResponse health;
  for (int i = 0; i < 200; ++i) {
    health = c.HttpGet("/health");
    if (health.status == 503) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(health.status, 503) << health.body << c.router().Log();
  const grpc::Status load = get_load();
  EXPECT_EQ(load.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(load.error_message().find("expert 5 has no live expert server"), std::string::npos)
      << load.error_message();
  EXPECT_NE(c.router().Log().find("NOT ready"), std::string::npos) << c.router().Log();
  EXPECT_EQ(HealthStatus(c.router_port(), "dmoe.v1.RouterService"), 2);
  EXPECT_EQ(HealthStatus(c.router_port(), ""), 1) << "still live: no restart";

  ASSERT_TRUE(c.StartExpert(1));
  for (int i = 0; i < 300; ++i) {
    health = c.HttpGet("/health");
    if (health.status == 200) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(health.status, 200) << health.body << c.router().Log();
  EXPECT_TRUE(get_load().ok());
  EXPECT_EQ(HealthStatus(c.router_port(), "dmoe.v1.RouterService"), 1);
  absl::StatusOr<std::vector<int32_t>> got;
  for (int i = 0; i < 50; ++i) {  // the router's stream to the new process reconnects
    got = c.Generate({9, 17, 3}, 2);
    if (got.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(got.ok()) << got.status();
}

}  // namespace
}  // namespace dmoe
