#include "core/gating.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace dmoe::core {

GateParams GateParams::FromConfig(const ModelConfig& cfg) {
  GateParams p;
  p.num_experts = cfg.n_routed_experts;
  p.top_k = cfg.num_experts_per_tok;
  p.scoring = cfg.scoring_func;
  p.method = cfg.topk_method;
  p.n_group = cfg.n_group;
  p.topk_group = cfg.topk_group;
  p.norm_topk_prob = cfg.norm_topk_prob;
  p.routed_scaling_factor = cfg.routed_scaling_factor;
  return p;
}

namespace {

// Indices of the k largest values, descending, ties to the lower index.
void TopK(const float* v, int64_t n, int64_t k, int32_t* out, std::vector<int32_t>& scratch) {
  scratch.resize(n);
  std::iota(scratch.begin(), scratch.end(), 0);
  std::partial_sort(scratch.begin(), scratch.begin() + k, scratch.end(),
                    [v](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  std::copy(scratch.begin(), scratch.begin() + k, out);
}

}  // namespace

GateResult SelectExperts(const GateParams& p, std::span<const float> logits, int64_t num_tokens,
                         std::span<const float> bias) {
  const int64_t E = p.num_experts, K = p.top_k;
  GateResult r;
  r.num_tokens = num_tokens;
  r.top_k = K;
  r.experts.resize(num_tokens * K);
  r.weights.resize(num_tokens * K);
  r.scores.resize(num_tokens * E);
  const bool use_bias = p.method == TopkMethod::kNoauxTc && !bias.empty();
  const bool grouped = p.n_group > 1 && p.method != TopkMethod::kGreedy;
  const int64_t group_size = grouped ? E / p.n_group : E;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  std::vector<float> choice(E), group_score(p.n_group);
  std::vector<int32_t> scratch, top_groups(p.topk_group);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* l = logits.data() + t * E;
    float* s = r.scores.data() + t * E;
    if (p.scoring == ScoringFunc::kSoftmax) {
      float mx = kNegInf;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(l[e]) - mx);
      for (int64_t e = 0; e < E; ++e) {
        s[e] = static_cast<float>(std::exp(static_cast<double>(l[e]) - mx) / sum);
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        s[e] = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(l[e]))));
      }
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = use_bias ? s[e] + bias[e] : s[e];

    if (grouped) {
      for (int64_t g = 0; g < p.n_group; ++g) {
        const float* c = choice.data() + g * group_size;
        if (p.method == TopkMethod::kGroupLimitedGreedy) {
          group_score[g] = *std::max_element(c, c + group_size);
        } else {  // noaux_tc: sum of the two largest
          float a = kNegInf, b = kNegInf;
          for (int64_t i = 0; i < group_size; ++i) {
            if (c[i] > a) {
              b = a;
              a = c[i];
            } else if (c[i] > b) {
              b = c[i];
            }
          }
          group_score[g] = a + b;
        }
      }
      TopK(group_score.data(), p.n_group, p.topk_group, top_groups.data(), scratch);
      std::vector<bool> keep(p.n_group, false);
      for (int32_t g : top_groups) keep[g] = true;
      for (int64_t e = 0; e < E; ++e) {
        if (!keep[e / group_size]) choice[e] = kNegInf;
      }
    }

    int32_t* chosen = r.experts.data() + t * K;
    TopK(choice.data(), E, K, chosen, scratch);
    float* w = r.weights.data() + t * K;
    for (int64_t k = 0; k < K; ++k) w[k] = s[chosen[k]];
    if (p.norm_topk_prob && K > 1) {
      float sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += w[k];
      const float denom = sum + 1e-20f;
      for (int64_t k = 0; k < K; ++k) w[k] /= denom;
    }
    const float scale = static_cast<float>(p.routed_scaling_factor);
    for (int64_t k = 0; k < K; ++k) w[k] *= scale;
  }
  return r;
}

}  // namespace dmoe::core
