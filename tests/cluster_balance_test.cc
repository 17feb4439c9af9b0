// Live expert re-placement with real processes: a router running the
// placement controller over 3 dmoe-expert servers, with routing skewed on
// purpose (--gate-bias-for-testing: experts 0-2, all on server 0 of the
// starting placement, win most tokens). The controller sees the imbalance
// and re-places on its own; the load measured on the servers afterwards is
// even; streams running during the switch all finish, with exactly the tokens
// of the one-process model (same bias).
#include <atomic>
#include <fstream>
#include <thread>

#include "core/model.h"
#include "core/sampler.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::Cluster;

constexpr char kBiasFlag[] = "0:3,1:3,2:3";

std::vector<float> Bias(const core::ModelConfig& cfg) {
  std::vector<float> b(cfg.n_routed_experts, 0.0f);
  b[0] = b[1] = b[2] = 3.0f;
  return b;
}

std::vector<int32_t> BiasedGreedy(core::Model& m, std::vector<int32_t> prompt, int n) {
  core::KvCache cache(m.config(), 1 << 24);
  const int32_t s = *cache.Allocate(static_cast<int64_t>(prompt.size()) + n);
  std::vector<int32_t> out, step = prompt;
  std::vector<float> logits;
  for (int i = 0; i < n; ++i) {
    core::SeqInput in{s, step, false};
    EXPECT_TRUE(m.Forward({&in, 1}, cache, &logits).ok());
    out.push_back(core::ArgMax(logits));
    step = {out.back()};
  }
  return out;
}

class RouterControl {
 public:
  explicit RouterControl(int port)
      : stub_(v1::RouterService::NewStub(grpc::CreateChannel(
            "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()))) {}
  v1::PlacementResponse Placement() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::PlacementResponse r;
    EXPECT_TRUE(stub_->GetPlacement(&ctx, v1::PlacementRequest(), &r).ok());
    return r;
  }
  v1::ExpertLoadResponse Load() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ExpertLoadResponse r;
    EXPECT_TRUE(stub_->GetExpertLoad(&ctx, v1::ExpertLoadRequest(), &r).ok());
    return r;
  }

 private:
  std::unique_ptr<v1::RouterService::Stub> stub_;
};

// Tokens each expert server has computed (all slots, all layers) since start.
std::vector<double> ServerTokens(const std::vector<std::string>& addresses) {
  std::vector<double> out;
  for (const std::string& a : addresses) {
    auto stub =
        v1::ExpertService::NewStub(grpc::CreateChannel(a, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ServerStatusResponse st;
    EXPECT_TRUE(stub->GetStatus(&ctx, v1::ServerStatusRequest(), &st).ok()) << a;
    double sum = 0;
    for (uint64_t n : st.tokens_computed()) sum += static_cast<double>(n);
    out.push_back(sum);
  }
  return out;
}

double MaxOverMean(const std::vector<double>& v) {
  double sum = 0, mx = 0;
  for (double x : v) {
    sum += x;
    mx = std::max(mx, x);
  }
  return sum > 0 ? mx / (sum / static_cast<double>(v.size())) : 0.0;
}

int ReadPort(const std::string& file) {
  std::ifstream in(file);
  int port = 0;
  in >> port;
  return port;
}

TEST(ClusterBalance, SkewIsRebalancedLiveWithoutFailuresAndWithTheSameTokens) {
  const std::string model = testing::MakeModel("tiny-v3", 34);
  const std::string dir = testing::FreshDir("cluster_balance");
  core::ModelOptions mo;
  mo.compute = core::ComputeType::kF32;
  auto cfg = core::ModelConfig::FromFile(model + "/config.json");
  ASSERT_TRUE(cfg.ok());
  mo.gate_bias_for_testing = Bias(*cfg);
  auto local = core::Model::Load(model, std::move(mo));
  ASSERT_TRUE(local.ok()) << local.status();
  constexpr int kThreads = 4, kPrompts = 3, kTokens = 8;
  std::vector<std::vector<int32_t>> prompts, want;
  for (int i = 0; i < kThreads * kPrompts; ++i) {
    std::vector<int32_t> p = {5 + i, 17, 3, 99, 250, 7, 42, 11};
    p.resize(3 + i % 6);
    prompts.push_back(p);
    want.push_back(BiasedGreedy(**local, p, kTokens));
  }

  Cluster c;
  ASSERT_TRUE(c.Start(
      model, 3, dir,
      {"--controller", "--slots-per-server", "7", "--rebalance-threshold", "1.3",
       "--rebalance-sustain-s", "2", "--rebalance-min-interval-s", "0", "--rebalance-min-tokens",
       "200", "--load-window-s", "30", "--gate-bias-for-testing", kBiasFlag}));
  RouterControl ctl(ReadPort(dir + "/router.port"));
  v1::PlacementResponse start = ctl.Placement();
  ASSERT_EQ(start.version(), 1u);
  const std::vector<std::string> servers(start.server_addresses().begin(),
                                         start.server_addresses().end());

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

  // Before: the router measures the skew (and the servers see it).
  const std::vector<double> t0 = ServerTokens(servers);
  double before = 0;
  uint64_t version = 1;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (version == 1 && std::chrono::steady_clock::now() < deadline) {
    v1::ExpertLoadResponse load = ctl.Load();
    version = load.placement_version();
    if (version == 1) {
      for (const v1::LayerLoad& l : load.layers()) {
        if (l.tokens() >= 200) before = std::max(before, l.server_max_over_mean());
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::vector<double> t1 = ServerTokens(servers);
  std::vector<double> phase1(servers.size());
  for (size_t s = 0; s < servers.size(); ++s) phase1[s] = t1[s] - t0[s];
  ASSERT_GE(version, 2u) << "the controller did not re-place:\n" << c.router().Log();
  EXPECT_GT(before, 1.3) << "router-measured imbalance before";
  EXPECT_GT(MaxOverMean(phase1), 1.3) << "server-measured imbalance before";

  // After: measured on the servers over a few seconds of the same load.
  const int at_switch = done;
  t1 = ServerTokens(servers);
  while (done < at_switch + 3 * kThreads * kPrompts &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const std::vector<double> t2 = ServerTokens(servers);
  stop = true;
  for (auto& t : threads) t.join();
  std::vector<double> phase2(servers.size());
  for (size_t s = 0; s < servers.size(); ++s) phase2[s] = t2[s] - t1[s];
  std::fprintf(stderr,
               "server max/mean: router-measured before %.3f; servers before %.3f, after %.3f\n",
               before, MaxOverMean(phase1), MaxOverMean(phase2));
  EXPECT_LE(MaxOverMean(phase2), 1.1) << "server-measured balance after";
  EXPECT_EQ(failed, 0);
  EXPECT_GT(done, at_switch);
  EXPECT_NE(c.router().Log().find("applied (imbalance)"), std::string::npos) << c.router().Log();
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(c.expert(i).Kill(SIGTERM), 0) << c.expert(i).Log();
}

}  // namespace
}  // namespace dmoe
