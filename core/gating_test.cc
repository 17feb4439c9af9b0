#include "core/gating.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

// Float64 reference of docs/model.md steps 2-6 for one token, by full sorts.
std::vector<std::pair<int, double>> Reference(const GateParams& p, const std::vector<float>& logits,
                                              const std::vector<float>& bias) {
  const int E = p.num_experts;
  std::vector<double> s(E), c(E);
  if (p.scoring == ScoringFunc::kSoftmax) {
    double mx = *std::max_element(logits.begin(), logits.end()), sum = 0;
    for (int e = 0; e < E; ++e) sum += std::exp(logits[e] - mx);
    for (int e = 0; e < E; ++e) s[e] = std::exp(logits[e] - mx) / sum;
  } else {
    for (int e = 0; e < E; ++e) s[e] = 1 / (1 + std::exp(-static_cast<double>(logits[e])));
  }
  for (int e = 0; e < E; ++e) c[e] = s[e] + (p.method == TopkMethod::kNoauxTc ? bias[e] : 0.0);
  std::vector<bool> ok(E, true);
  if (p.n_group > 1 && p.method != TopkMethod::kGreedy) {
    const int gs = E / p.n_group;
    std::vector<std::pair<double, int>> g;
    for (int i = 0; i < p.n_group; ++i) {
      std::vector<double> v(c.begin() + i * gs, c.begin() + (i + 1) * gs);
      std::sort(v.rbegin(), v.rend());
      g.push_back({p.method == TopkMethod::kNoauxTc ? v[0] + v[1] : v[0], i});
    }
    std::stable_sort(g.begin(), g.end(), [](auto a, auto b) { return a.first > b.first; });
    std::fill(ok.begin(), ok.end(), false);
    for (int i = 0; i < p.topk_group; ++i) {
      for (int e = 0; e < gs; ++e) ok[g[i].second * gs + e] = true;
    }
  }
  std::vector<int> idx;
  for (int e = 0; e < E; ++e) {
    if (ok[e]) idx.push_back(e);
  }
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return c[a] > c[b]; });
  std::vector<std::pair<int, double>> out;
  double sum = 0;
  for (int k = 0; k < p.top_k; ++k) {
    out.push_back({idx[k], s[idx[k]]});
    sum += s[idx[k]];
  }
  for (auto& [e, w] : out) {
    if (p.norm_topk_prob && p.top_k > 1) w /= sum;
    w *= p.routed_scaling_factor;
  }
  return out;
}

void ExpectMatchesReference(const GateParams& p, uint32_t seed, float bias_scale = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  const int T = 32;
  std::vector<float> logits(T * p.num_experts), bias(p.num_experts);
  for (float& l : logits) l = nd(rng);
  for (float& b : bias) b = bias_scale * nd(rng);
  GateResult r = SelectExperts(p, logits, T, bias);
  for (int t = 0; t < T; ++t) {
    std::vector<float> lt(logits.begin() + t * p.num_experts,
                          logits.begin() + (t + 1) * p.num_experts);
    auto ref = Reference(p, lt, bias);
    for (int k = 0; k < p.top_k; ++k) {
      ASSERT_EQ(r.experts[t * p.top_k + k], ref[k].first) << "token " << t << " slot " << k;
      // fp32 weights vs float64: a few ulps after softmax/normalisation.
      EXPECT_NEAR(r.weights[t * p.top_k + k], ref[k].second, 1e-6 * std::max(1.0, ref[k].second));
    }
  }
}

GateParams Params(int E, int K, ScoringFunc s, TopkMethod m, int groups, int topk_groups, bool norm,
                  double scale) {
  GateParams p;
  p.num_experts = E;
  p.top_k = K;
  p.scoring = s;
  p.method = m;
  p.n_group = groups;
  p.topk_group = topk_groups;
  p.norm_topk_prob = norm;
  p.routed_scaling_factor = scale;
  return p;
}

TEST(Gating, SoftmaxGreedy_MatchesReference) {
  ExpectMatchesReference(
      Params(64, 6, ScoringFunc::kSoftmax, TopkMethod::kGreedy, 1, 1, false, 1.0), 1);
}

TEST(Gating, SoftmaxGreedy_RoutedScalingWithoutNorm) {
  ExpectMatchesReference(
      Params(16, 4, ScoringFunc::kSoftmax, TopkMethod::kGreedy, 1, 1, false, 16.0), 2);
}

TEST(Gating, GreedyIgnoresGroups) {
  // topk_method greedy selects over all experts even when n_group > 1.
  ExpectMatchesReference(
      Params(16, 4, ScoringFunc::kSoftmax, TopkMethod::kGreedy, 4, 1, false, 1.0), 3);
}

TEST(Gating, GroupLimitedGreedy_MatchesReference) {
  ExpectMatchesReference(
      Params(32, 6, ScoringFunc::kSoftmax, TopkMethod::kGroupLimitedGreedy, 8, 3, false, 1.0), 4);
}

TEST(Gating, GroupLimitedGreedy_OnlyChosenGroups) {
  GateParams p =
      Params(8, 2, ScoringFunc::kSoftmax, TopkMethod::kGroupLimitedGreedy, 4, 1, false, 1.0);
  // Group 1 (experts 2,3) holds the single largest logit; group 3 has the two
  // next largest. With topk_group 1 only group 1 may be used.
  std::vector<float> logits = {0, 0, 5, 0, 0, 0, 4.5, 4.4};
  GateResult r = SelectExperts(p, logits, 1, {});
  EXPECT_EQ(r.experts[0], 2);
  EXPECT_EQ(r.experts[1], 3);
}

TEST(Gating, NoauxTc_MatchesReference) {
  ExpectMatchesReference(
      Params(64, 8, ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 8, 4, true, 2.5), 5, 0.1f);
}

TEST(Gating, NoauxTc_GroupScoreIsSumOfTopTwo) {
  GateParams p = Params(8, 2, ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 2, 1, false, 1.0);
  // Group 0 has one very high score; group 1 has two fairly high ones whose sum wins.
  std::vector<float> logits = {6, -6, -6, -6, 2, 2, -6, -6};
  GateResult r = SelectExperts(p, logits, 1, std::vector<float>(8, 0.0f));
  EXPECT_EQ(r.experts[0], 4);
  EXPECT_EQ(r.experts[1], 5);
}

TEST(Gating, NoauxTc_BiasChoosesButDoesNotWeigh) {
  GateParams p = Params(4, 1, ScoringFunc::kSigmoid, TopkMethod::kNoauxTc, 1, 1, false, 1.0);
  std::vector<float> logits = {1.0f, 0.0f, 0.0f, 0.0f};
  std::vector<float> bias = {0.0f, 0.0f, 0.0f, 1.0f};  // pushes expert 3 above expert 0
  GateResult r = SelectExperts(p, logits, 1, bias);
  ASSERT_EQ(r.experts[0], 3);
  EXPECT_FLOAT_EQ(r.weights[0], 0.5f);  // sigmoid(0), not sigmoid(0) + 1
}

TEST(Gating, NormTopkProbThenScale) {
  GateParams p = Params(4, 2, ScoringFunc::kSoftmax, TopkMethod::kGreedy, 1, 1, true, 2.0);
  std::vector<float> logits = {std::log(4.0f), std::log(2.0f), std::log(1.0f), std::log(1.0f)};
  GateResult r = SelectExperts(p, logits, 1, {});
  EXPECT_EQ(r.experts[0], 0);
  EXPECT_EQ(r.experts[1], 1);
  EXPECT_NEAR(r.weights[0], 2.0 * 4.0 / 6.0, 1e-6);
  EXPECT_NEAR(r.weights[1], 2.0 * 2.0 / 6.0, 1e-6);
}

TEST(Gating, TiesChooseLowerIndex) {
  GateParams p = Params(6, 2, ScoringFunc::kSoftmax, TopkMethod::kGreedy, 1, 1, false, 1.0);
  std::vector<float> logits = {0, 1, 1, 0, 1, 0};
  GateResult r = SelectExperts(p, logits, 1, {});
  EXPECT_EQ(r.experts[0], 1);
  EXPECT_EQ(r.experts[1], 2);
}

}  // namespace
}  // namespace dmoe::core
