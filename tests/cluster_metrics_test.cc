// Metrics of the running system, as Prometheus sees them: dmoe-router and 3
// dmoe-expert servers as real processes with /metrics on free ports, scraped
// every second by a real Prometheus server (Debian's `prometheus`, which
// tools/setup.sh installs), load driven through the router's gRPC API, and
// every assertion made through Prometheus's HTTP query API.
//
// Skipped (with a message) only when no prometheus binary is found
// ($DMOE_PROMETHEUS, else /usr/bin/prometheus, else PATH).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "core/config.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/ports.h"
#include "testing/prometheus.h"
#include "testing/subprocess.h"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using json = nlohmann::json;
using testing::ChildProcess;
using testing::FindPrometheus;
using testing::FreePort;
using testing::HttpRequest;
using testing::UrlEncode;
using testing::WaitForPortFile;

// One sample of an instant-query result: its labels and value.
struct Sample {
  std::map<std::string, std::string> labels;
  double value = 0;
};

// The system: expert servers, a router over them, and Prometheus scraping all.
class MetricsCluster {
 public:
  ~MetricsCluster() { Stop(); }

  // `expert_metrics`: per-expert or per-layer (router and servers alike).
  bool Start(const std::string& model, int servers, const std::string& dir,
             const std::string& expert_metrics, const std::string& prometheus) {
    dir_ = dir;
    std::string addrs;
    experts_.resize(servers);
    expert_metrics_ports_.resize(servers);
    for (int i = 0; i < servers; ++i) {
      const std::string name = "expert" + std::to_string(i);
      experts_[i] = std::make_unique<ChildProcess>();
      if (!experts_[i]->Start({testing::BinDir() + "/dmoe-expert",
                               "--model",
                               model,
                               "--server-index",
                               std::to_string(i),
                               "--num-servers",
                               std::to_string(servers),
                               "--dtype",
                               "f32",
                               "--threads",
                               "1",
                               "--port",
                               "0",
                               "--port-file",
                               dir + "/" + name + ".port",
                               "--metrics-port",
                               "0",
                               "--metrics-port-file",
                               dir + "/" + name + ".metrics.port",
                               "--expert-metrics",
                               expert_metrics},
                              dir + "/" + name + ".log")) {
        return false;
      }
      const int port = WaitForPortFile(dir + "/" + name + ".port", *experts_[i]);
      if (port == 0) {
        ADD_FAILURE() << name << " did not start:\n" << experts_[i]->Log();
        return false;
      }
      // Written before the service's port file.
      expert_metrics_ports_[i] = WaitForPortFile(dir + "/" + name + ".metrics.port", *experts_[i]);
      if (i) addrs += ",";
      addrs += "127.0.0.1:" + std::to_string(port);
    }
    if (!router_.Start({testing::BinDir() + "/dmoe-router", "--model", model, "--experts", addrs,
                        "--dtype", "f32", "--threads", "1", "--port", "0", "--port-file",
                        dir + "/router.port", "--metrics-port", "0", "--metrics-port-file",
                        dir + "/router.metrics.port", "--expert-metrics", expert_metrics},
                       dir + "/router.log")) {
      return false;
    }
    const int router_port = WaitForPortFile(dir + "/router.port", router_);
    if (router_port == 0) {
      ADD_FAILURE() << "router did not start:\n" << router_.Log();
      return false;
    }
    router_metrics_port_ = WaitForPortFile(dir + "/router.metrics.port", router_);
    stub_ = v1::RouterService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(router_port), grpc::InsecureChannelCredentials()));
    return StartPrometheus(prometheus);
  }

  // Forward of `tokens` (all positions): tokens.size() tokens through the model.
  bool Forward(const std::vector<int32_t>& tokens) {
    v1::ForwardRequest req;
    for (int32_t t : tokens) req.add_tokens(t);
    req.set_all_positions(true);
    v1::ForwardResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    const grpc::Status st = stub_->Forward(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return st.ok();
  }

  // Generation of exactly `n` tokens: prompt + n - 1 tokens through the model.
  bool Generate(const std::vector<int32_t>& prompt, int n) {
    v1::GenerateRequest req;
    for (int32_t t : prompt) req.add_prompt_tokens(t);
    req.set_max_tokens(n);
    req.set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse resp;
    int got = 0;
    while (reader->Read(&resp)) ++got;
    const grpc::Status st = reader->Finish();
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(got, n);
    return st.ok() && got == n;
  }

  // Instant query; fails the test (and returns nothing) unless Prometheus
  // answers "success" with a vector.
  std::vector<Sample> Query(const std::string& promql) {
    const testing::HttpResponse r =
        HttpRequest(prometheus_port_, "GET", "/api/v1/query?query=" + UrlEncode(promql));
    json j = json::parse(r.body, nullptr, /*allow_exceptions=*/false);
    if (r.status != 200 || j.is_discarded() || j["status"] != "success" ||
        j["data"]["resultType"] != "vector") {
      ADD_FAILURE() << promql << ": HTTP " << r.status << " " << r.body;
      return {};
    }
    std::vector<Sample> out;
    for (const json& s : j["data"]["result"]) {
      Sample x;
      for (const auto& [k, v] : s["metric"].items()) x.labels[k] = v.get<std::string>();
      x.value = std::stod(s["value"][1].get<std::string>());
      out.push_back(std::move(x));
    }
    return out;
  }

  // The value of a query that yields one sample, or -1.
  double Scalar(const std::string& promql) {
    const std::vector<Sample> r = Query(promql);
    return r.size() == 1 ? r[0].value : -1;
  }

  // Polls `promql` (one sample) until it equals `want` (Prometheus has
  // scraped the final counters); false after `timeout`.
  bool WaitFor(const std::string& promql, double want,
               std::chrono::seconds timeout = std::chrono::seconds(60)) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    double got = -1;
    while (std::chrono::steady_clock::now() < end) {
      const std::vector<Sample> r = Query(promql);
      got = r.size() == 1 ? r[0].value : -1;
      if (got == want) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    ADD_FAILURE() << promql << " = " << got << ", want " << want << "\nprometheus log:\n"
                  << prometheus_.Log();
    return false;
  }

  void Stop() {
    prometheus_.Kill(SIGTERM);
    router_.Kill(SIGTERM);
    for (auto& e : experts_) {
      if (e) e->Kill(SIGTERM);
    }
  }

  ChildProcess& router() { return router_; }

 private:
  bool StartPrometheus(const std::string& binary) {
    // The expert servers' targets carry their index as `server`, the label the
    // router uses for them, so that both sides can be matched per server.
    std::string config =
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: dmoe-router\n    static_configs:\n      - targets: ['127.0.0.1:" +
        std::to_string(router_metrics_port_) +
        "']\n  - job_name: dmoe-expert\n    static_configs:\n";
    for (size_t i = 0; i < expert_metrics_ports_.size(); ++i) {
      config += "      - targets: ['127.0.0.1:" + std::to_string(expert_metrics_ports_[i]) +
                "']\n        labels: {server: '" + std::to_string(i) + "'}\n";
    }
    std::ofstream(dir_ + "/prometheus.yml") << config;
    // The port is picked before Prometheus binds it: retry on a lost race.
    for (int attempt = 0; attempt < 3; ++attempt) {
      prometheus_port_ = FreePort();
      const std::string tsdb = dir_ + "/tsdb" + std::to_string(attempt);
      if (!prometheus_.Start(
              {binary, "--config.file=" + dir_ + "/prometheus.yml", "--storage.tsdb.path=" + tsdb,
               "--web.listen-address=127.0.0.1:" + std::to_string(prometheus_port_),
               "--log.level=warn"},
              dir_ + "/prometheus.log")) {
        return false;
      }
      const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (std::chrono::steady_clock::now() < end && prometheus_.Running()) {
        if (HttpRequest(prometheus_port_, "GET", "/-/ready", "", 5).status == 200) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      prometheus_.Kill(SIGKILL);
    }
    ADD_FAILURE() << "prometheus did not become ready:\n" << prometheus_.Log();
    return false;
  }

  std::string dir_;
  std::vector<std::unique_ptr<ChildProcess>> experts_;
  std::vector<int> expert_metrics_ports_;
  ChildProcess router_;
  int router_metrics_port_ = 0;
  ChildProcess prometheus_;
  int prometheus_port_ = 0;
  std::unique_ptr<v1::RouterService::Stub> stub_;
};

struct Load {
  int64_t tokens = 0;  // through the model (prefill + decode inputs)
};

// Two generations and a forward of mixed lengths.
Load DriveLoad(MetricsCluster& c) {
  Load l;
  const std::vector<int32_t> a = {5, 17, 3, 99, 250, 7, 42, 11}, b = {300, 2, 77},
                             f = {9, 8, 7, 6, 5};
  if (c.Generate(a, 6)) l.tokens += static_cast<int64_t>(a.size()) + 6 - 1;
  if (c.Generate(b, 4)) l.tokens += static_cast<int64_t>(b.size()) + 4 - 1;
  if (c.Forward(f)) l.tokens += static_cast<int64_t>(f.size());
  return l;
}

class ClusterMetrics : public ::testing::Test {
 protected:
  void SetUp() override {
    prometheus_ = FindPrometheus();
    if (prometheus_.empty()) {
      GTEST_SKIP() << "no prometheus binary (apt-get install prometheus, or tools/setup.sh; "
                      "or set DMOE_PROMETHEUS)";
    }
    model_ = testing::MakeModel("tiny-v3", 41);
    auto cfg = core::ModelConfig::FromFile(model_ + "/config.json");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      if (cfg_.IsMoeLayer(l)) moe_layers_.push_back(l);
    }
    ASSERT_FALSE(moe_layers_.empty());
  }

  std::string prometheus_, model_;
  core::ModelConfig cfg_;
  std::vector<int64_t> moe_layers_;
};

TEST_F(ClusterMetrics, RouterAndExpertServersAgreeThroughPrometheus) {
  constexpr int kServers = 3;
  const std::string dir = testing::FreshDir("cluster_metrics");
  MetricsCluster c;
  ASSERT_TRUE(c.Start(model_, kServers, dir, "per-expert", prometheus_));
  ASSERT_TRUE(c.WaitFor("count(up == 1)", 1 + kServers));

  const Load load = DriveLoad(c);
  ASSERT_GT(load.tokens, 0);
  const double K = static_cast<double>(cfg_.num_experts_per_tok);
  const double L = static_cast<double>(moe_layers_.size());
  const double E = static_cast<double>(cfg_.n_routed_experts);
  const double assignments = static_cast<double>(load.tokens) * K * L;
  // Counters reach Prometheus within a scrape or two of the last request.
  ASSERT_TRUE(c.WaitFor("sum(moe_router_routed_tokens_total)", assignments));
  ASSERT_TRUE(c.WaitFor("sum(moe_expert_slot_tokens_total)", assignments));
  ASSERT_TRUE(c.WaitFor("moe_router_step_tokens_total", static_cast<double>(load.tokens)));
  ASSERT_TRUE(c.WaitFor("sum(moe_expert_batch_tokens_sum)",
                        c.Scalar("sum(moe_router_server_tokens_total)")));

  // Routed tokens: every (MoE layer, expert) series exists; each layer routes
  // tokens x top_k assignments.
  EXPECT_EQ(c.Scalar("count(moe_router_routed_tokens_total)"), L * E);
  for (const Sample& s : c.Query("sum by (layer) (moe_router_routed_tokens_total)")) {
    EXPECT_EQ(s.value, static_cast<double>(load.tokens) * K) << "layer " << s.labels.at("layer");
  }
  // The expert servers computed exactly what the router routed, per (layer,
  // expert) (no failovers, every expert on one server).
  std::map<std::pair<std::string, std::string>, double> routed;
  for (const Sample& s : c.Query("moe_router_routed_tokens_total")) {
    routed[{s.labels.at("layer"), s.labels.at("expert")}] = s.value;
  }
  const std::vector<Sample> computed =
      c.Query("sum by (layer, expert) (moe_expert_slot_tokens_total)");
  EXPECT_EQ(computed.size(), routed.size());
  for (const Sample& s : computed) {
    const auto key = std::make_pair(s.labels.at("layer"), s.labels.at("expert"));
    EXPECT_EQ(s.value, routed[key]) << "layer " << key.first << " expert " << key.second;
  }

  for (int i = 0; i < kServers; ++i) {
    const std::string server = "{server=\"" + std::to_string(i) + "\"}";
    SCOPED_TRACE("server " + std::to_string(i));
    // Tokens sent = rows the server computed (its batches' token sums).
    const double sent = c.Scalar("moe_router_server_tokens_total" + server);
    EXPECT_GT(sent, 0);
    EXPECT_EQ(c.Scalar("moe_expert_batch_tokens_sum" + server), sent);
    EXPECT_GT(c.Scalar("moe_router_server_round_trip_seconds_count" + server), 0);
    EXPECT_GT(c.Scalar("moe_router_server_sent_bytes_total" + server), 0);
    EXPECT_GT(c.Scalar("moe_router_server_received_bytes_total" + server), 0);
    EXPECT_GT(c.Scalar("moe_expert_compute_seconds_count" + server), 0);
    EXPECT_GT(c.Scalar("sum(moe_expert_resident_weight_bytes" + server + ")"), 0);
    EXPECT_EQ(c.Scalar("moe_expert_placement_version" + server), 1);
    EXPECT_EQ(c.Scalar("moe_router_server_info" + server), 1);
    EXPECT_EQ(c.Scalar("sum(moe_expert_requests_total{code!=\"OK\"," + server.substr(1) + ")"), -1)
        << "no request failed";
  }
  EXPECT_EQ(c.Scalar("moe_router_placement_version"), 1);
  EXPECT_EQ(c.Scalar("moe_router_failed_steps_total"), 0);
  EXPECT_EQ(c.Scalar("sum(moe_router_server_failovers_total)"), -1) << "no failover series";

  // Balance over the load window (60 s: all of the load): max/mean is >= 1
  // by definition; the DeepSeek statistics (1 = balanced) are >= 1 here
  // because the gates choose the most probable experts, so f and P correlate
  // (not a theorem; this model, seed and load give 1.02 to 1.14).
  for (const char* gauge :
       {"moe_router_layer_server_max_over_mean", "moe_router_layer_slot_max_over_mean",
        "moe_router_layer_expert_balance_stat", "moe_router_layer_server_balance_stat"}) {
    const std::vector<Sample> per_layer = c.Query(gauge);
    EXPECT_EQ(per_layer.size(), moe_layers_.size()) << gauge;
    for (const Sample& s : per_layer) {
      std::fprintf(stderr, "%s{layer=%s} = %.4f\n", gauge, s.labels.at("layer").c_str(), s.value);
      EXPECT_GE(s.value, 1.0 - 1e-9) << gauge << " layer " << s.labels.at("layer");
    }
  }
  EXPECT_GE(c.Scalar("moe_router_server_max_over_mean"), 1.0 - 1e-9);
  EXPECT_EQ(c.Scalar("sum(moe_router_server_load)"),
            c.Scalar("sum(moe_router_routed_tokens_total)"))
      << "without replicas, the servers' load is all the routed assignments";
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
}

TEST_F(ClusterMetrics, PerLayerModeExportsOneSeriesPerLayer) {
  constexpr int kServers = 2;
  const std::string dir = testing::FreshDir("cluster_metrics_per_layer");
  MetricsCluster c;
  ASSERT_TRUE(c.Start(model_, kServers, dir, "per-layer", prometheus_));
  const Load load = DriveLoad(c);
  const double K = static_cast<double>(cfg_.num_experts_per_tok);
  const double L = static_cast<double>(moe_layers_.size());
  ASSERT_TRUE(c.WaitFor("sum(moe_router_routed_tokens_total)", load.tokens * K * L));
  ASSERT_TRUE(c.WaitFor("sum(moe_expert_slot_tokens_total)", load.tokens * K * L));
  EXPECT_EQ(c.Scalar("count(moe_router_routed_tokens_total)"), L);
  EXPECT_EQ(c.Scalar("count(moe_router_routed_tokens_total{expert=\"all\"})"), L);
  EXPECT_EQ(c.Scalar("count(moe_expert_slot_tokens_total{expert!=\"all\"})"), -1)
      << "no per-expert series on the servers";
  EXPECT_EQ(c.Scalar("count(moe_expert_slot_tokens_total)"), L * kServers);
  for (const Sample& s : c.Query("moe_router_routed_tokens_total")) {
    EXPECT_EQ(s.value, load.tokens * K) << "layer " << s.labels.at("layer");
  }
}

}  // namespace
}  // namespace dmoe
