#include "router_service/router_metrics.h"

#include <memory>
#include <string>
#include <vector>

#include "common/metrics_endpoint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/cluster_util.h"

namespace dmoe::router {
namespace {

using ::testing::HasSubstr;

// 3 layers, layer 0 dense; 4 routed experts, top-2.
core::ModelConfig Config() {
  core::ModelConfig c;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 4;
  c.num_experts_per_tok = 2;
  return c;
}

// Each token's experts from `choices` (top_k per token); scores uniform
// unless given (one row for all tokens).
core::GateResult Routing(std::vector<std::vector<int32_t>> choices,
                         std::vector<float> scores = {}) {
  core::GateResult r;
  r.num_tokens = static_cast<int64_t>(choices.size());
  r.top_k = 2;
  if (scores.empty()) scores.assign(4, 0.25f);
  for (const auto& c : choices) {
    r.experts.insert(r.experts.end(), c.begin(), c.end());
    r.weights.insert(r.weights.end(), c.size(), 0.5f);
    r.scores.insert(r.scores.end(), scores.begin(), scores.end());
  }
  return r;
}

// The metric `name` with exactly `labels`, or null.
const prometheus::ClientMetric* Find(const std::vector<prometheus::MetricFamily>& families,
                                     const std::string& name, prometheus::Labels labels = {}) {
  for (const auto& f : families) {
    if (f.name != name) continue;
    for (const auto& m : f.metric) {
      prometheus::Labels got;
      for (const auto& l : m.label) got[l.name] = l.value;
      if (got == labels) return &m;
    }
  }
  return nullptr;
}

double Value(const std::vector<prometheus::MetricFamily>& families, const std::string& name,
             prometheus::Labels labels = {}) {
  const prometheus::ClientMetric* m = Find(families, name, labels);
  EXPECT_NE(m, nullptr) << name;
  if (m == nullptr) return -1;
  return m->counter.value + m->gauge.value;  // the other one is 0
}

size_t SeriesCount(const std::vector<prometheus::MetricFamily>& families, const std::string& name) {
  for (const auto& f : families) {
    if (f.name == name) return f.metric.size();
  }
  return 0;
}

struct Fixture {
  Fixture(bool per_expert = true, int servers = 2)
      : cfg(Config()),
        placement(*place::Placement::Contiguous(cfg, servers)),
        window(cfg.num_hidden_layers, cfg.n_routed_experts, servers, LoadWindowOptions{}),
        metrics(registry, cfg, placement, &window, {per_expert, {"10.0.0.1:1", "10.0.0.2:1"}}) {}
  core::ModelConfig cfg;
  place::Placement placement;
  prometheus::Registry registry;
  LoadWindow window;
  RouterMetrics metrics;
};

TEST(RouterMetrics, StepStagesAddUpPerStageAndPhase) {
  Fixture f;
  auto fams = f.registry.Collect();
  // Every (stage, phase) series exists from the start.
  EXPECT_EQ(SeriesCount(fams, "moe_router_step_stage_seconds_total"),
            static_cast<size_t>(2 * core::kNumStages));
  EXPECT_EQ(Value(fams, "moe_router_phase_steps_total", {{"phase", "prefill"}}), 0);
  core::StageTimes t;
  t.Add(core::Stage::kAttention, 0.25);
  t.Add(core::Stage::kExperts, 0.5);
  f.metrics.OnStepStages(t, /*prefill=*/true);
  f.metrics.OnStepStages(t, /*prefill=*/false);
  f.metrics.OnStepStages(t, /*prefill=*/false);
  fams = f.registry.Collect();
  EXPECT_EQ(Value(fams, "moe_router_step_stage_seconds_total",
                  {{"stage", "attention"}, {"phase", "decode"}}),
            0.5);
  EXPECT_EQ(Value(fams, "moe_router_step_stage_seconds_total",
                  {{"stage", "experts"}, {"phase", "prefill"}}),
            0.5);
  EXPECT_EQ(Value(fams, "moe_router_step_stage_seconds_total",
                  {{"stage", "lm_head"}, {"phase", "decode"}}),
            0);
  EXPECT_EQ(Value(fams, "moe_router_phase_steps_total", {{"phase", "decode"}}), 2);
  EXPECT_EQ(Value(fams, "moe_router_phase_steps_total", {{"phase", "prefill"}}), 1);
}

TEST(RouterMetrics, RoutedTokensCountEveryAssignmentPerLayerAndExpert) {
  Fixture f;
  auto fams = f.registry.Collect();
  // Every (MoE layer, expert) series exists from the start, at 0; none for
  // the dense layer.
  EXPECT_EQ(SeriesCount(fams, "moe_router_routed_tokens_total"), 2u * 4u);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "1"}, {"expert", "3"}}), 0);
  EXPECT_EQ(Find(fams, "moe_router_routed_tokens_total", {{"layer", "0"}, {"expert", "0"}}),
            nullptr);

  f.metrics.OnRoute(1, Routing({{0, 2}, {0, 3}, {0, 2}}));
  f.metrics.OnRoute(2, Routing({{1, 2}}));
  f.metrics.OnRoute(1, Routing({{3, 0}}));
  fams = f.registry.Collect();
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "1"}, {"expert", "0"}}), 4);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "1"}, {"expert", "1"}}), 0);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "1"}, {"expert", "2"}}), 2);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "1"}, {"expert", "3"}}), 2);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "2"}, {"expert", "1"}}), 1);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "2"}, {"expert", "2"}}), 1);
  // ... and the window saw the same.
  const LoadSnapshot s = f.window.Get(absl::Now());
  EXPECT_EQ(s.Assignments(1, 0), 4);
  EXPECT_EQ(s.tokens[1], 4);
  EXPECT_EQ(s.tokens[2], 1);
}

TEST(RouterMetrics, PerLayerModeHasOneSeriesPerLayerWithExpertAll) {
  Fixture f(/*per_expert=*/false);
  f.metrics.OnRoute(1, Routing({{0, 2}, {0, 3}, {0, 2}}));
  f.metrics.OnRoute(2, Routing({{1, 2}}));
  const auto fams = f.registry.Collect();
  EXPECT_EQ(SeriesCount(fams, "moe_router_routed_tokens_total"), 2u);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "1"}, {"expert", "all"}}), 6);
  EXPECT_EQ(Value(fams, "moe_router_routed_tokens_total", {{"layer", "2"}, {"expert", "all"}}), 2);
}

TEST(RouterMetrics, ServerTrafficRoundTripsAndFailovers) {
  Fixture f;
  place::ServerShare share;
  share.tokens = {0, 1, 2};
  f.metrics.OnSend(1, 0, share, 1000);
  f.metrics.OnSend(2, 0, share, 500);
  share.tokens = {5};
  f.metrics.OnSend(1, 1, share, 100);
  f.metrics.OnReply(1, 0, 3, 900, absl::Microseconds(300));
  f.metrics.OnReply(2, 0, 3, 450, absl::Milliseconds(20));
  f.metrics.OnFailover(1, 1, absl::StatusCode::kUnavailable, 4, 1);
  f.metrics.OnFailover(2, 1, absl::StatusCode::kUnavailable, 2, 0);
  f.metrics.OnFailover(2, 1, absl::StatusCode::kDeadlineExceeded, 0, 3);
  const auto fams = f.registry.Collect();
  EXPECT_EQ(Value(fams, "moe_router_server_tokens_total", {{"server", "0"}}), 6);
  EXPECT_EQ(Value(fams, "moe_router_server_tokens_total", {{"server", "1"}}), 1);
  EXPECT_EQ(Value(fams, "moe_router_server_sent_bytes_total", {{"server", "0"}}), 1500);
  EXPECT_EQ(Value(fams, "moe_router_server_received_bytes_total", {{"server", "0"}}), 1350);
  EXPECT_EQ(Value(fams, "moe_router_server_received_bytes_total", {{"server", "1"}}), 0);
  const auto* rt = Find(fams, "moe_router_server_round_trip_seconds", {{"server", "0"}});
  ASSERT_NE(rt, nullptr);
  EXPECT_EQ(rt->histogram.sample_count, 2u);
  EXPECT_NEAR(rt->histogram.sample_sum, 0.0203, 1e-9);
  EXPECT_EQ(rt->histogram.bucket.front().upper_bound, 50e-6);
  EXPECT_EQ(rt->histogram.bucket.front().cumulative_count, 0u);
  EXPECT_EQ(
      Value(fams, "moe_router_server_failovers_total", {{"server", "1"}, {"code", "UNAVAILABLE"}}),
      2);
  EXPECT_EQ(Value(fams, "moe_router_server_failovers_total",
                  {{"server", "1"}, {"code", "DEADLINE_EXCEEDED"}}),
            1);
  EXPECT_EQ(Value(fams, "moe_router_resent_tokens_total"), 6);
  EXPECT_EQ(Value(fams, "moe_router_stranded_tokens_total"), 4);
  EXPECT_EQ(Value(fams, "moe_router_server_info", {{"server", "1"}, {"address", "10.0.0.2:1"}}), 1);
  // Tokens per (layer, server) went into the window too.
  const LoadSnapshot s = f.window.Get(absl::Now());
  EXPECT_EQ(s.ServerTokens(1, 0), 3);
  EXPECT_EQ(s.ServerTokens(2, 0), 3);
  EXPECT_EQ(s.ServerTokens(1, 1), 1);
}

TEST(RouterMetrics, BalanceGaugesAreOneWhenBalancedAndMaxOverMeanWhenNot) {
  Fixture f;
  f.metrics.Refresh();
  auto fams = f.registry.Collect();
  // No tokens yet: 0, not a made-up 1.
  EXPECT_EQ(Value(fams, "moe_router_layer_server_max_over_mean", {{"layer", "1"}}), 0);
  EXPECT_EQ(Value(fams, "moe_router_server_max_over_mean"), 0);

  // Layer 1: every expert chosen twice (servers {0,1} and {2,3} equally loaded).
  f.metrics.OnRoute(1, Routing({{0, 2}, {1, 3}, {0, 3}, {1, 2}}));
  // Layer 2: every token chooses 0 and 1 (both on server 0), with all the
  // probability on them.
  f.metrics.OnRoute(2, Routing({{0, 1}, {0, 1}, {0, 1}, {0, 1}}, {0.5f, 0.5f, 0, 0}));
  f.metrics.Refresh();
  fams = f.registry.Collect();
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_server_max_over_mean", {{"layer", "1"}}), 1);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_slot_max_over_mean", {{"layer", "1"}}), 1);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_expert_balance_stat", {{"layer", "1"}}), 1);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_server_balance_stat", {{"layer", "1"}}), 1);
  // Layer 2: server loads 8, 0 (mean 4); slot loads 4, 4, 0, 0 (mean 2);
  // f = 1, P = 0.5 for experts 0 and 1: N/K * (0.5 + 0.5) = 2; server level:
  // f'_0 = mean(N/K * f * S/N) = 2, P'_0 = 1, server 1 nothing: 2.
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_server_max_over_mean", {{"layer", "2"}}), 2);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_slot_max_over_mean", {{"layer", "2"}}), 2);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_expert_balance_stat", {{"layer", "2"}}), 2);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_server_balance_stat", {{"layer", "2"}}), 2);
  // All layers: server 0 carries 4 + 8, server 1 carries 4 (mean 8).
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_server_load", {{"server", "0"}}), 12);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_server_load", {{"server", "1"}}), 4);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_server_max_over_mean"), 1.5);
  // The same numbers as ComputeBalance on the window (one definition).
  const LoadSnapshot s = f.window.Get(absl::Now());
  const LayerBalance b = ComputeBalance(s, 2, 2, f.placement);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_server_balance_stat", {{"layer", "2"}}),
                   b.server_stat);
}

TEST(RouterMetrics, SetPlacementChangesVersionAndTheBalanceItIsMeasuredAgainst) {
  Fixture f;
  EXPECT_EQ(Value(f.registry.Collect(), "moe_router_placement_version"), 1);
  f.metrics.OnRoute(2, Routing({{0, 1}, {0, 1}}));
  f.metrics.Refresh();
  EXPECT_DOUBLE_EQ(
      Value(f.registry.Collect(), "moe_router_layer_server_max_over_mean", {{"layer", "2"}}), 2);
  // Version 2 replicates experts 0 and 1 on server 1: the load is now shared.
  const nlohmann::json j = nlohmann::json::parse(R"({"version": 2, "num_servers": 2, "layers": [
      {"layer": 1, "servers": [[0, 1], [2, 3]]},
      {"layer": 2, "servers": [[0, 1], [0, 1, 2, 3]]}]})");
  auto p2 = place::Placement::FromJson(j, f.cfg);
  ASSERT_TRUE(p2.ok()) << p2.status();
  f.metrics.SetPlacement(*p2);
  f.metrics.Refresh();
  const auto fams = f.registry.Collect();
  EXPECT_EQ(Value(fams, "moe_router_placement_version"), 2);
  EXPECT_DOUBLE_EQ(Value(fams, "moe_router_layer_server_max_over_mean", {{"layer", "2"}}), 1);
}

TEST(RouterMetrics, SetServersReplacesTheServerInfo) {
  Fixture f;
  f.metrics.SetServers({"10.0.0.1:1", "10.0.0.3:1", "10.0.0.4:1"});
  const auto fams = f.registry.Collect();
  EXPECT_EQ(SeriesCount(fams, "moe_router_server_info"), 3u);
  EXPECT_EQ(Find(fams, "moe_router_server_info", {{"server", "1"}, {"address", "10.0.0.2:1"}}),
            nullptr);
  EXPECT_EQ(Value(fams, "moe_router_server_info", {{"server", "2"}, {"address", "10.0.0.4:1"}}), 1);
}

TEST(RouterMetrics, ReplacementsAreCountedByTrigger) {
  Fixture f;
  f.metrics.RecordReplacement("balance", 1 << 20, absl::Milliseconds(700));
  f.metrics.RecordReplacement("balance", 1 << 20, absl::Seconds(3));
  f.metrics.RecordReplacement("operator", 100, absl::Milliseconds(30));
  const auto fams = f.registry.Collect();
  EXPECT_EQ(Value(fams, "moe_router_replacements_total", {{"trigger", "balance"}}), 2);
  EXPECT_EQ(Value(fams, "moe_router_replacements_total", {{"trigger", "operator"}}), 1);
  EXPECT_EQ(Value(fams, "moe_router_replacement_bytes_moved_total"), 2 * (1 << 20) + 100);
  const auto* h = Find(fams, "moe_router_replacement_switch_seconds");
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->histogram.sample_count, 3u);
}

TEST(RouterMetrics, SchedulerGaugesAndCountersFollowTheLoadSource) {
  Fixture f;
  SchedulerLoad load;
  load.active_sequences = 3;
  load.queued_requests = 2;
  load.kv_cache_free_bytes = 1000;
  load.kv_cache_budget_bytes = 4000;
  load.steps = 10;
  load.step_tokens = 70;
  load.failed_steps = 1;
  f.metrics.SetLoadSource([&load] { return load; });
  f.metrics.Refresh();
  load.steps = 15;
  load.step_tokens = 80;
  load.active_sequences = 1;
  f.metrics.Refresh();
  f.metrics.Refresh();  // nothing new: counters stay
  const auto fams = f.registry.Collect();
  EXPECT_EQ(Value(fams, "moe_router_active_sequences"), 1);
  EXPECT_EQ(Value(fams, "moe_router_queued_requests"), 2);
  EXPECT_EQ(Value(fams, "moe_router_kv_cache_free_bytes"), 1000);
  EXPECT_EQ(Value(fams, "moe_router_kv_cache_budget_bytes"), 4000);
  EXPECT_EQ(Value(fams, "moe_router_steps_total"), 15);
  EXPECT_EQ(Value(fams, "moe_router_step_tokens_total"), 80);
  EXPECT_EQ(Value(fams, "moe_router_failed_steps_total"), 1);
}

// The endpoint the binaries serve: a scrape refreshes first; an explicit port
// that is taken is an error, the default one only a warning.
TEST(MetricsEndpoint, ServesTheRefreshedRegistryAndReportsATakenPort) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto& g =
      prometheus::BuildGauge().Name("moe_test_gauge").Help("test").Register(*registry).Add({});
  int refreshes = 0;
  auto collectable = std::make_shared<common::RefreshingCollectable>(registry, [&] {
    ++refreshes;
    g.Set(refreshes);
  });
  auto e = common::MetricsEndpoint::Start("127.0.0.1", 0, collectable);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_GT((*e)->port(), 0);
  const testing::HttpResponse r = testing::HttpRequest((*e)->port(), "GET", "/metrics");
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_THAT(r.body, HasSubstr("moe_test_gauge 1\n"));

  auto taken = common::MetricsEndpoint::Start("127.0.0.1", (*e)->port(), collectable);
  ASSERT_FALSE(taken.ok());
  EXPECT_EQ(taken.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(taken.status().message(),
              HasSubstr("metrics: cannot listen on 127.0.0.1:" + std::to_string((*e)->port())));
  auto explicit_port = common::ServeMetrics("test", "127.0.0.1", (*e)->port(),
                                            /*port_explicit=*/true, "", collectable);
  EXPECT_EQ(explicit_port.status().code(), absl::StatusCode::kUnavailable);
  auto default_port = common::ServeMetrics("test", "127.0.0.1", (*e)->port(),
                                           /*port_explicit=*/false, "", collectable);
  ASSERT_TRUE(default_port.ok()) << default_port.status();
  EXPECT_EQ(*default_port, nullptr);
}

TEST(MetricsEndpoint, ExpertMetricsFlag) {
  EXPECT_EQ(*common::ParseExpertMetricsFlag("per-expert"), true);
  EXPECT_EQ(*common::ParseExpertMetricsFlag("per-layer"), false);
  auto bad = common::ParseExpertMetricsFlag("per-slot");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("got 'per-slot'"));
}

}  // namespace
}  // namespace dmoe::router
