#include "router_service/load_window.h"

#include "gtest/gtest.h"

namespace dmoe::router {
namespace {

// `tokens` tokens of one layer, each choosing `experts` with softmax-like
// scores (uniform over all experts unless `scores` is given).
core::GateResult Routing(int64_t tokens, std::vector<int32_t> experts, int64_t num_experts,
                         std::vector<float> scores = {}) {
  core::GateResult r;
  r.num_tokens = tokens;
  r.top_k = static_cast<int64_t>(experts.size());
  if (scores.empty()) scores.assign(num_experts, 1.0f / static_cast<float>(num_experts));
  for (int64_t t = 0; t < tokens; ++t) {
    r.experts.insert(r.experts.end(), experts.begin(), experts.end());
    r.weights.insert(r.weights.end(), experts.size(), 0.5f);
    r.scores.insert(r.scores.end(), scores.begin(), scores.end());
  }
  return r;
}

const absl::Time kT0 = absl::FromUnixSeconds(1000);

TEST(LoadWindow, SlidingWindowForgetsWhatIsOlderThanTheWindow) {
  LoadWindowOptions o;
  o.window = absl::Seconds(3);
  LoadWindow w(2, 4, 2, o);
  w.AddRouting(1, Routing(10, {0, 1}, 4), kT0);
  w.AddServerTokens(1, 1, 7, kT0);
  w.AddRouting(1, Routing(5, {2, 1}, 4), kT0 + absl::Seconds(1));
  LoadSnapshot s = w.Get(kT0 + absl::Seconds(2));
  EXPECT_EQ(s.Assignments(1, 0), 10);
  EXPECT_EQ(s.Assignments(1, 1), 15);
  EXPECT_EQ(s.Assignments(1, 2), 5);
  EXPECT_EQ(s.tokens[1], 15);
  EXPECT_EQ(s.ServerTokens(1, 1), 7);
  EXPECT_DOUBLE_EQ(s.prob_sum[1 * 4 + 3], 15 * 0.25);
  s = w.Get(kT0 + absl::Seconds(3));  // the first second is out
  EXPECT_EQ(s.Assignments(1, 0), 0);
  EXPECT_EQ(s.Assignments(1, 1), 5);
  EXPECT_EQ(s.ServerTokens(1, 1), 0);
  s = w.Get(kT0 + absl::Seconds(30));
  EXPECT_EQ(s.tokens[1], 0);
  w.AddRouting(1, Routing(2, {3, 1}, 4), kT0 + absl::Seconds(31));
  EXPECT_EQ(w.Get(kT0 + absl::Seconds(31)).Assignments(1, 3), 2);
  w.Clear();
  EXPECT_EQ(w.Get(kT0 + absl::Seconds(31)).Assignments(1, 3), 0);
}

TEST(LoadWindow, EmaHalvesPerHalfLife) {
  LoadWindowOptions o;
  o.mode = LoadWindowOptions::Mode::kEma;
  o.window = absl::Seconds(2);
  LoadWindow w(1, 2, 1, o);
  w.AddRouting(0, Routing(8, {0}, 2), kT0);
  EXPECT_DOUBLE_EQ(w.Get(kT0).Assignments(0, 0), 8);
  EXPECT_NEAR(w.Get(kT0 + absl::Seconds(2)).Assignments(0, 0), 4, 1e-9);
  EXPECT_NEAR(w.Get(kT0 + absl::Seconds(4)).Assignments(0, 0), 2, 1e-9);
}

TEST(LoadBalance, UniformLoadIsOneEverywhere) {
  LoadWindow w(1, 4, 2, {});
  // 40 tokens spread evenly: each expert chosen by 20 (top-2).
  w.AddRouting(0, Routing(20, {0, 1}, 4), kT0);
  w.AddRouting(0, Routing(20, {2, 3}, 4), kT0);
  core::ModelConfig cfg;
  cfg.model_type = core::ModelType::kDeepseekV2;
  cfg.num_hidden_layers = 1;
  cfg.first_k_dense_replace = 0;
  cfg.n_routed_experts = 4;
  cfg.num_experts_per_tok = 2;
  auto p = place::Placement::Contiguous(cfg, 2);
  ASSERT_TRUE(p.ok()) << p.status();
  LayerBalance b = ComputeBalance(w.Get(kT0), 0, 2, *p);
  EXPECT_DOUBLE_EQ(b.server_max_over_mean, 1.0);
  EXPECT_DOUBLE_EQ(b.slot_max_over_mean, 1.0);
  EXPECT_NEAR(b.expert_stat, 1.0, 1e-12);
  EXPECT_NEAR(b.server_stat, 1.0, 1e-12);
}

TEST(LoadBalance, SkewedLoadAndReplicas) {
  core::ModelConfig cfg;
  cfg.model_type = core::ModelType::kDeepseekV2;
  cfg.num_hidden_layers = 1;
  cfg.first_k_dense_replace = 0;
  cfg.n_routed_experts = 4;
  cfg.num_experts_per_tok = 1;
  LoadWindow w(1, 4, 2, {});
  // Expert 0 gets 30 tokens (with probability 0.7), the others 10 each.
  w.AddRouting(0, Routing(30, {0}, 4, {0.7f, 0.1f, 0.1f, 0.1f}), kT0);
  w.AddRouting(0, Routing(10, {1}, 4), kT0);
  w.AddRouting(0, Routing(10, {2}, 4), kT0);
  w.AddRouting(0, Routing(10, {3}, 4), kT0);
  auto contiguous = place::Placement::Contiguous(cfg, 2);  // {0,1} {2,3}
  ASSERT_TRUE(contiguous.ok());
  LayerBalance b = ComputeBalance(w.Get(kT0), 0, 1, *contiguous);
  EXPECT_DOUBLE_EQ(b.server_max_over_mean, 40.0 / 30.0);
  EXPECT_DOUBLE_EQ(b.slot_max_over_mean, 30.0 / 15.0);
  // f = {.5, 1/6, 1/6, 1/6}; P = {(30·.7 + 30·.25)/60, ...}
  const double p0 = (30 * 0.7 + 30 * 0.25) / 60, pi = (30 * 0.1 + 30 * 0.25) / 60;
  EXPECT_NEAR(b.expert_stat, 4.0 * (0.5 * p0 + 3 * (1.0 / 6) * pi), 1e-6);
  EXPECT_GT(b.expert_stat, 1.0);
  // Expert 0 replicated on both servers: {0,1} {0,2,3}.
  nlohmann::json j = {{"version", 2},
                      {"num_servers", 2},
                      {"layers", {{{"layer", 0}, {"servers", {{0, 1}, {0, 2, 3}}}}}}};
  auto replicated = place::Placement::FromJson(j, cfg);
  ASSERT_TRUE(replicated.ok()) << replicated.status();
  b = ComputeBalance(w.Get(kT0), 0, 1, *replicated);
  EXPECT_DOUBLE_EQ(b.server_max_over_mean, 35.0 / 30.0);  // 15+10 vs 15+10+10
  EXPECT_DOUBLE_EQ(b.slot_max_over_mean, 15.0 / 12.0);
}

}  // namespace
}  // namespace dmoe::router
