// The observability the deployment ships, against the real system and a real
// Prometheus: 3 dmoe-expert servers, a dmoe-router with the placement
// controller and a dmoe-gateway on loopback (the flags of docker-compose.yml
// where they matter), scraped by Debian's `prometheus` with the job names and
// target labels of deploy/prometheus/prometheus.yml and the Kubernetes
// ServiceMonitors, and loading the alert rules of
// deploy/prometheus/dmoe-rules.yml (a copy whose `for:` durations are cut to 1
// s).
//
// Load goes through the gateway's HTTP API (a malformed request included), the
// operator triggers a re-placement (`dmoe ctl rebalance`), then an expert
// server is killed (its router sees failovers). After that:
//   - DmoeServerDown is firing (/api/v1/alerts);
//   - every PromQL expression of the Grafana dashboard (panels, annotations,
//     variables, with $layer / $__rate_interval / $__interval substituted)
//     returns at least one series;
//   - every alert rule evaluates, and its measure (the expression without its
//     trailing `OP THRESHOLD`) returns series;
//   - the prometheus-adapter queries behind the HPA return one series per pod.
//
// Skipped (with a message) without a prometheus binary ($DMOE_PROMETHEUS,
// /usr/bin/prometheus, PATH) or a python3 with PyYAML (to read the rules).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/files.h"
#include "testing/ports.h"
#include "testing/prometheus.h"
#include "testing/subprocess.h"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::BinDir;
using testing::ChildProcess;
using testing::FindInPath;
using testing::FindPrometheus;
using testing::FreePort;
using testing::HttpRequest;
using testing::ReadFile;
using testing::RunCommand;
using testing::RunResult;
using testing::SourceDir;
using testing::UrlEncode;
using testing::WaitForPortFile;

// A Python 3 with PyYAML, or "".
std::string PythonWithYaml() {
  for (const std::string& p : {std::string("/usr/bin/python3"), FindInPath("python3")}) {
    if (!p.empty() && access(p.c_str(), X_OK) == 0 &&
        RunCommand({p, "-c", "import yaml"}).code == 0) {
      return p;
    }
  }
  return "";
}

json YamlToJson(const std::string& python, const std::string& text) {
  const RunResult r = RunCommand({python, "-c",
                                  "import sys, yaml, json\njson.dump(yaml.safe_load(sys.stdin), "
                                  "sys.stdout)"},
                                 {.input = text});
  EXPECT_EQ(r.code, 0);
  json j = json::parse(r.out, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << r.out;
  return j;
}

// `expr` = MEASURE OP NUMBER: {MEASURE, true}; otherwise {expr, false}.
std::pair<std::string, bool> Measure(const std::string& expr) {
  std::smatch m;
  if (std::regex_match(
          expr, m,
          std::regex(R"(^([\s\S]*\S)\s*(==|!=|>=|<=|>|<)\s*-?[0-9.]+(e[+-]?[0-9]+)?\s*$)"))) {
    return {m[1], true};
  }
  return {expr, false};
}

// The whole deployment on loopback, as deploy/ wires it, with Prometheus.
class Deployment {
 public:
  ~Deployment() {
    prometheus_.Kill(SIGKILL);
    gateway_.Kill(SIGKILL);
    router_.Kill(SIGKILL);
    for (auto& e : experts_) e->Kill(SIGKILL);
  }

  bool Start(const std::string& model, int servers, const std::string& dir,
             const std::string& rules, const std::string& prometheus) {
    dir_ = dir;
    std::string addrs;
    for (int i = 0; i < servers; ++i) {
      const std::string name = dir + "/expert" + std::to_string(i);
      experts_.push_back(std::make_unique<ChildProcess>());
      if (!experts_[i]->Start(
              {BinDir() + "/dmoe-expert", "--model=" + model, "--server-index=" + std::to_string(i),
               "--num-servers=" + std::to_string(servers), "--host=127.0.0.1", "--port=0",
               "--port-file=" + name + ".port", "--metrics-host=127.0.0.1", "--metrics-port=0",
               "--metrics-port-file=" + name + ".metrics", "--threads=1", "--leave-timeout-s=5",
               "--drain-timeout-s=5"},
              name + ".log")) {
        return false;
      }
      expert_ports_.push_back(WaitForPortFile(name + ".port", *experts_[i]));
      expert_metrics_.push_back(WaitForPortFile(name + ".metrics", *experts_[i]));
      if (expert_ports_[i] == 0) {
        ADD_FAILURE() << "expert " << i << " did not start:\n" << experts_[i]->Log();
        return false;
      }
      addrs += (i ? "," : "") + Address(i);
    }
    // docker-compose.yml's router: the controller, slots to spare for a lost
    // server.
    if (!router_.Start(
            {BinDir() + "/dmoe-router", "--model=" + model, "--experts=" + addrs, "--controller",
             "--slots-per-server=8", "--rebalance=manual", "--host=127.0.0.1", "--port=0",
             "--port-file=" + dir + "/router.port", "--metrics-host=127.0.0.1", "--metrics-port=0",
             "--metrics-port-file=" + dir + "/router.metrics", "--threads=1"},
            dir + "/router.log")) {
      return false;
    }
    router_port_ = WaitForPortFile(dir + "/router.port", router_);
    router_metrics_ = WaitForPortFile(dir + "/router.metrics", router_);
    if (router_port_ == 0) {
      ADD_FAILURE() << "router did not start:\n" << router_.Log();
      return false;
    }
    if (!gateway_.Start(
            {BinDir() + "/dmoe-gateway", "--routers=127.0.0.1:" + std::to_string(router_port_),
             "--host=127.0.0.1", "--http-port=0", "--port-file=" + dir + "/gateway.port",
             "--poll-interval-ms=100"},
            dir + "/gateway.log")) {
      return false;
    }
    gateway_port_ = WaitForPortFile(dir + "/gateway.port", gateway_);
    if (gateway_port_ == 0) {
      ADD_FAILURE() << "gateway did not start:\n" << gateway_.Log();
      return false;
    }
    for (int i = 0; i < 100 && HttpRequest(gateway_port_, "GET", "/health").status != 200; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return StartPrometheus(rules, prometheus);
  }

  std::string Address(int i) const { return "127.0.0.1:" + std::to_string(expert_ports_[i]); }
  int router_port() const { return router_port_; }
  ChildProcess& expert(int i) { return *experts_[i]; }
  ChildProcess& router() { return router_; }
  ChildProcess& prometheus() { return prometheus_; }

  testing::HttpResponse Post(const std::string& path, const std::string& body) {
    return HttpRequest(gateway_port_, "POST", path, body, 30);
  }

  // Instant query: the result vector, or a failure (and nothing) unless
  // Prometheus answers "success".
  json Query(const std::string& promql) {
    const testing::HttpResponse r =
        HttpRequest(prometheus_port_, "GET", "/api/v1/query?query=" + UrlEncode(promql), "", 10);
    json j = json::parse(r.body, nullptr, false);
    if (r.status != 200 || j.is_discarded() || j["status"] != "success") {
      ADD_FAILURE() << promql << ": HTTP " << r.status << " " << r.body;
      return json::array();
    }
    if (j["data"]["resultType"] != "vector") {
      ADD_FAILURE() << promql << ": " << j["data"]["resultType"] << ", expected a vector";
      return json::array();
    }
    return j["data"]["result"];
  }

  double Sum(const std::string& promql) {
    const json r = Query("sum(" + promql + ")");
    return r.empty() ? -1 : std::stod(r[0]["value"][1].get<std::string>());
  }

  // Polls `ok` every 250 ms until true or `timeout`.
  bool WaitUntil(const std::function<bool()>& ok, std::chrono::seconds timeout) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      if (ok()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    return false;
  }

  json Alerts() {
    const testing::HttpResponse r = HttpRequest(prometheus_port_, "GET", "/api/v1/alerts", "", 10);
    json j = json::parse(r.body, nullptr, false);
    return j.is_discarded() ? json::array() : j["data"]["alerts"];
  }

 private:
  // Target labels as the deployment gives them: job names of the
  // ServiceMonitors and docker-compose's Prometheus, `server` and `address`
  // (the router's name) on expert servers, `namespace` and `pod` as the
  // Prometheus Operator adds them (the prometheus-adapter rules select on
  // those).
  bool StartPrometheus(const std::string& rules, const std::string& binary) {
    auto target = [](int port, const std::string& labels) {
      return "      - targets: ['127.0.0.1:" + std::to_string(port) +
             "']\n        labels: {namespace: dmoe, " + labels + "}\n";
    };
    std::string config =
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  "
        "evaluation_interval: 1s\n"
        "rule_files: ['" +
        rules +
        "']\n"
        "scrape_configs:\n"
        "  - job_name: dmoe-gateway\n    static_configs:\n" +
        target(gateway_port_, "pod: dmoe-gateway-0") +
        "  - job_name: dmoe-router\n    static_configs:\n" +
        target(router_metrics_, "pod: dmoe-router-0") +
        "  - job_name: dmoe-expert\n    static_configs:\n";
    for (size_t i = 0; i < experts_.size(); ++i) {
      config +=
          target(expert_metrics_[i], "pod: dmoe-expert-" + std::to_string(i) + ", server: '" +
                                         std::to_string(i) + "', address: '" + Address(i) + "'");
    }
    std::ofstream(dir_ + "/prometheus.yml") << config;
    for (int attempt = 0; attempt < 3; ++attempt) {
      prometheus_port_ = FreePort();
      if (!prometheus_.Start({binary, "--config.file=" + dir_ + "/prometheus.yml",
                              "--storage.tsdb.path=" + dir_ + "/tsdb" + std::to_string(attempt),
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
  std::vector<int> expert_ports_, expert_metrics_;
  ChildProcess router_, gateway_, prometheus_;
  int router_port_ = 0, router_metrics_ = 0, gateway_port_ = 0, prometheus_port_ = 0;
};

// Every `expr` in a Grafana dashboard: panel targets (rows' nested panels too)
// and annotations; `label_values(METRIC, LABEL)` variables as count by (LABEL).
std::vector<std::pair<std::string, std::string>> DashboardExprs(const json& d) {  // (where, expr)
  std::vector<std::pair<std::string, std::string>> out;
  std::function<void(const json&)> panel = [&](const json& p) {
    for (const json& t : p.value("targets", json::array())) {
      if (t.contains("expr")) out.emplace_back("panel '" + p.value("title", "") + "'", t["expr"]);
    }
    for (const json& sub : p.value("panels", json::array())) panel(sub);
  };
  for (const json& p : d["panels"]) panel(p);
  for (const json& a : d["annotations"]["list"]) {
    if (a.contains("expr")) out.emplace_back("annotation '" + a.value("name", "") + "'", a["expr"]);
  }
  for (const json& v : d["templating"]["list"]) {
    if (v.value("type", "") != "query") continue;
    const std::string q = v["query"].is_object() ? v["query"]["query"].get<std::string>()
                                                 : v["query"].get<std::string>();
    std::smatch m;
    if (std::regex_match(q, m, std::regex(R"(label_values\(\s*(.+?)\s*,\s*(\w+)\s*\))"))) {
      out.emplace_back("variable $" + v["name"].get<std::string>(),
                       "count by (" + m[2].str() + ") (" + m[1].str() + ")");
    } else {
      out.emplace_back("variable $" + v["name"].get<std::string>(), q);
    }
  }
  return out;
}

std::string Substitute(std::string expr, const std::map<std::string, std::string>& vars) {
  // Longest names first ($__rate_interval before $__interval).
  std::vector<std::pair<std::string, std::string>> sorted(vars.begin(), vars.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  for (const auto& [k, v] : sorted) {
    for (const std::string& pat : {"${" + k.substr(1) + "}", k}) {
      for (size_t p; (p = expr.find(pat)) != std::string::npos;) expr.replace(p, pat.size(), v);
    }
  }
  return expr;
}

TEST(ClusterObservability, DashboardAndAlertQueriesReturnSeriesAndServerDownFires) {
  const std::string prometheus = FindPrometheus();
  if (prometheus.empty()) {
    GTEST_SKIP() << "no prometheus binary (apt-get install prometheus, or "
                    "tools/setup.sh; or set DMOE_PROMETHEUS)";
  }
  const std::string dir = testing::FreshDir("observability");
  const std::string python = PythonWithYaml();
  if (python.empty())
    GTEST_SKIP() << "no python3 with PyYAML to read the rules (apt-get install "
                    "python3-yaml)";
  const std::string src = SourceDir();

  // The deploy rules, with every `for:` cut to 1 s so that an alert fires in
  // seconds.
  const std::string rules_text = ReadFile(src + "/deploy/prometheus/dmoe-rules.yml");
  ASSERT_FALSE(rules_text.empty());
  std::ofstream(dir + "/dmoe-rules.yml")
      << std::regex_replace(rules_text, std::regex(R"(\bfor: \S+)"), "for: 1s");
  const json rules = YamlToJson(python, rules_text);
  const json dashboard =
      json::parse(ReadFile(src + "/deploy/grafana/dashboards/dmoe.json"), nullptr, false);
  ASSERT_FALSE(dashboard.is_discarded());
  const json adapter =
      YamlToJson(python, ReadFile(src + "/deploy/prometheus/prometheus-adapter-values.yaml"));

  constexpr int kServers = 3;
  const std::string model = testing::MakeModel("tiny-v3", 11);
  Deployment d;
  ASSERT_TRUE(d.Start(model, kServers, dir + "", dir + "/dmoe-rules.yml", prometheus));
  ASSERT_TRUE(d.WaitUntil([&] { return d.Sum("up") == kServers + 2; }, std::chrono::seconds(30)))
      << "all targets up";

  // Load through the public API: completions (one streamed), a chat completion,
  // and a malformed request (an error series).
  auto completion = [&](bool stream) {
    return d.Post("/v1/completions",
                  std::string(R"({"prompt": [5, 17, 3, 99, 250, 7], "max_tokens": 6,)") +
                      R"( "ignore_eos": true, "stream": )" + (stream ? "true" : "false") + "}");
  };
  for (int i = 0; i < 3; ++i) EXPECT_EQ(completion(i == 1).status, 200);
  EXPECT_EQ(d.Post("/v1/chat/completions",
                   R"({"messages": [{"role": "user", "content": [9, 8, 7]}], "max_tokens": 4})")
                .status,
            200);
  EXPECT_EQ(d.Post("/v1/completions", "{").status, 400);
  // The operator re-places (moe_router_replacements_total{trigger="operator"}).
  const auto [ctl_code, ctl_out, ctl_err] =
      RunCommand({BinDir() + "/dmoe", "ctl", "rebalance", "--router",
                  "127.0.0.1:" + std::to_string(d.router_port())});
  ASSERT_EQ(ctl_code, 0) << ctl_out << d.router().Log();
  for (int i = 0; i < 2; ++i) EXPECT_EQ(completion(false).status, 200);
  ASSERT_TRUE(d.WaitUntil([&] { return d.Sum("moe_router_replacements_total") >= 1; },
                          std::chrono::seconds(20)));
  ASSERT_TRUE(
      d.WaitUntil([&] { return d.Sum(R"(moe_gateway_http_requests_total{code="400"})") >= 1; },
                  std::chrono::seconds(20)));

  // An expert server dies: the router's next dispatch to it fails over, and
  // DmoeServerDown fires for its target.
  d.expert(kServers - 1).Kill(SIGKILL);
  completion(false);  // may fail (tokens of experts without a replica): only
                      // its failover matters
  ASSERT_TRUE(d.WaitUntil([&] { return d.Sum("moe_router_server_failovers_total") > 0; },
                          std::chrono::seconds(30)))
      << d.router().Log();
  json firing;
  ASSERT_TRUE(d.WaitUntil(
      [&] {
        for (const json& a : d.Alerts()) {
          if (a["labels"].value("alertname", "") == "DmoeServerDown" &&
              a.value("state", "") == "firing") {
            firing = a;
            return true;
          }
        }
        return false;
      },
      std::chrono::seconds(30)))
      << "alerts: " << d.Alerts().dump() << "\n"
      << d.prometheus().Log();
  EXPECT_EQ(firing["labels"].value("job", ""), "dmoe-expert");
  EXPECT_EQ(firing["labels"].value("address", ""), d.Address(kServers - 1));
  EXPECT_EQ(firing["labels"].value("severity", ""), "critical");
  // Let every new series (failovers) have two samples in its rate window.
  std::this_thread::sleep_for(std::chrono::seconds(3));

  // Grafana's variables: a real MoE layer, and rate windows covering the test.
  const json layers = d.Query("count by (layer) (moe_router_routed_tokens_total)");
  ASSERT_FALSE(layers.empty());
  const std::map<std::string, std::string> vars = {
      {"$layer", layers[0]["metric"]["layer"].get<std::string>()},
      {"$__rate_interval", "5m"},
      {"$__interval", "5m"}};
  int checked = 0;
  for (const auto& [where, raw] : DashboardExprs(dashboard)) {
    const std::string expr = Substitute(raw, vars);
    EXPECT_EQ(expr.find('$'), std::string::npos) << where << ": unsubstituted variable in " << expr;
    const json r = d.Query(Measure(expr).first);
    EXPECT_FALSE(r.empty()) << "dashboard " << where << ": no series for\n  "
                            << Measure(expr).first;
    ++checked;
  }
  EXPECT_GE(checked, 30) << "dashboard expressions";

  int alerts = 0;
  for (const json& group : rules["groups"]) {
    for (const json& rule : group["rules"]) {
      const std::string expr = rule["expr"];
      const auto [measure, compared] = Measure(expr);
      SCOPED_TRACE(rule.value("alert", rule.value("record", "")));
      if (rule.contains("alert")) {
        ++alerts;
        EXPECT_TRUE(compared) << "an alert is MEASURE OP THRESHOLD: " << expr;
      }
      d.Query(expr);  // evaluates (may be empty: nothing to alert on)
      EXPECT_FALSE(d.Query(measure).empty()) << "no series for " << measure;
    }
  }
  EXPECT_GE(alerts, 4) << "imbalance, server down, dispatch latency, queue saturation";

  // The HPA's metrics through prometheus-adapter's queries: one series per live
  // pod.
  for (const json& rule : adapter["rules"]["custom"]) {
    std::string series = rule["name"]["matches"];
    series = std::regex_replace(series, std::regex(R"(^\^|\$$)"), "");
    std::string q = rule["metricsQuery"];
    q = std::regex_replace(q, std::regex(R"(<<\.Series>>)"), series);
    q = std::regex_replace(q, std::regex(R"(<<\.LabelMatchers>>)"),
                           R"(namespace="dmoe",pod=~"dmoe-expert-0|dmoe-expert-1|dmoe-expert-2")");
    q = std::regex_replace(q, std::regex(R"(<<\.GroupBy>>)"), "pod");
    const json r = d.Query(q);
    EXPECT_GE(r.size(), static_cast<size_t>(kServers - 1)) << rule["name"]["as"] << ": " << q;
    for (const json& s : r) EXPECT_TRUE(s["metric"].contains("pod")) << q;
  }
}

}  // namespace
}  // namespace dmoe
