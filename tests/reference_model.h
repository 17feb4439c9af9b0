// A plain float64 reference of the DeepSeek-family forward pass, written for the
// tests straight from docs/model.md and independent of the product code's math:
// per-head k/v (not the absorbed MLA form), RoPE/YaRN recomputed here, gating by
// full sorts, experts one token at a time. Only the checkpoint reader and the
// config parser are shared with the product.
#ifndef DMOE_TESTS_REFERENCE_MODEL_H_
#define DMOE_TESTS_REFERENCE_MODEL_H_

#include <algorithm>
#include <cmath>
#include <map>
#include <numbers>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/config.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"

namespace dmoe::testing {

using Vec = std::vector<double>;

class ReferenceModel {
 public:
  ReferenceModel(const core::ModelConfig& cfg, const core::Checkpoint& ckpt)
      : cfg_(cfg), ckpt_(ckpt) {}

  // Logits [T, vocab] for every position of `tokens`.
  std::vector<Vec> Forward(const std::vector<int32_t>& tokens) {
    const int64_t T = tokens.size(), Hd = cfg_.hidden_size;
    const Vec& emb = W("model.embed_tokens.weight");
    std::vector<Vec> x(T, Vec(Hd));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < Hd; ++i) x[t][i] = emb[tokens[t] * Hd + i];
    }
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      std::vector<Vec> xn(T);
      for (int64_t t = 0; t < T; ++t) xn[t] = Norm(x[t], W(p + "input_layernorm.weight"));
      std::vector<Vec> a = cfg_.IsMla() ? Mla(xn, p + "self_attn.") : Mha(xn, p + "self_attn.");
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < Hd; ++i) x[t][i] += a[t][i];
      }
      for (int64_t t = 0; t < T; ++t) {
        Vec h = Norm(x[t], W(p + "post_attention_layernorm.weight"));
        Vec y =
            cfg_.IsMoeLayer(l) ? Moe(h, p + "mlp.") : Ffn(h, p + "mlp.", cfg_.intermediate_size);
        for (int64_t i = 0; i < Hd; ++i) x[t][i] += y[i];
      }
    }
    std::vector<Vec> logits(T);
    const std::string head =
        cfg_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    for (int64_t t = 0; t < T; ++t) {
      logits[t] = MatVec(W(head), cfg_.vocab_size, Hd, Norm(x[t], W("model.norm.weight")));
    }
    return logits;
  }

  // Routing of one normalised hidden state: (expert, weight) pairs.
  std::vector<std::pair<int, double>> Route(const Vec& h, const std::string& p) {
    const int64_t E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
    Vec logits = MatVec(W(p + "gate.weight"), E, cfg_.hidden_size, h);
    Vec s(E);
    if (cfg_.scoring_func == core::ScoringFunc::kSoftmax) {
      const double mx = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(logits[e] - mx);
      for (int64_t e = 0; e < E; ++e) s[e] = std::exp(logits[e] - mx) / sum;
    } else {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-logits[e]));
    }
    Vec choice = s;
    if (cfg_.topk_method == core::TopkMethod::kNoauxTc) {
      const Vec& bias = W(p + "gate.e_score_correction_bias");
      for (int64_t e = 0; e < E; ++e) choice[e] += bias[e];
    }
    std::vector<bool> allowed(E, true);
    if (cfg_.n_group > 1 && cfg_.topk_method != core::TopkMethod::kGreedy) {
      const int64_t G = cfg_.n_group, gs = E / G;
      std::vector<std::pair<double, int>> groups;
      for (int64_t g = 0; g < G; ++g) {
        Vec v(choice.begin() + g * gs, choice.begin() + (g + 1) * gs);
        std::sort(v.rbegin(), v.rend());
        groups.push_back({cfg_.topk_method == core::TopkMethod::kNoauxTc ? v[0] + v[1] : v[0],
                          static_cast<int>(g)});
      }
      std::stable_sort(groups.begin(), groups.end(),
                       [](auto& a, auto& b) { return a.first > b.first; });
      std::fill(allowed.begin(), allowed.end(), false);
      for (int64_t i = 0; i < cfg_.topk_group; ++i) {
        for (int64_t e = 0; e < gs; ++e) allowed[groups[i].second * gs + e] = true;
      }
    }
    std::vector<int> order;
    for (int64_t e = 0; e < E; ++e) {
      if (allowed[e]) order.push_back(static_cast<int>(e));
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return choice[a] > choice[b]; });
    std::vector<std::pair<int, double>> out;
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      out.push_back({order[k], s[order[k]]});
      sum += s[order[k]];
    }
    for (auto& [e, w] : out) {
      if (cfg_.norm_topk_prob && K > 1) w /= sum;
      w *= cfg_.routed_scaling_factor;
    }
    return out;
  }

 private:
  const Vec& W(const std::string& name) {
    auto it = cache_.find(name);
    if (it != cache_.end()) return it->second;
    auto view = ckpt_.Get(name);
    if (!view.ok()) {
      ADD_FAILURE() << view.status();
      return cache_[name];
    }
    std::vector<float> f(view->NumElements());
    auto st = ckpt_.ReadF32(name, view->shape, f.data());
    if (!st.ok()) ADD_FAILURE() << st;
    return cache_[name] = Vec(f.begin(), f.end());
  }

  static Vec MatVec(const Vec& w, int64_t rows, int64_t cols, const Vec& x, int64_t row0 = 0) {
    Vec y(rows);
    for (int64_t r = 0; r < rows; ++r) {
      double acc = 0;
      for (int64_t c = 0; c < cols; ++c) acc += w[(row0 + r) * cols + c] * x[c];
      y[r] = acc;
    }
    return y;
  }

  Vec Norm(const Vec& x, const Vec& w) const {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double r = 1.0 / std::sqrt(ss / x.size() + cfg_.rms_norm_eps);
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
    return y;
  }

  // Per-pair rotation angles' inverse frequencies and cos/sin multiplier, from
  // docs/model.md.
  void RopeParams(int64_t d, Vec* inv, double* mult) const {
    inv->assign(d / 2, 0);
    const auto& rs = cfg_.rope_scaling;
    const double theta = cfg_.rope_theta;
    for (int64_t j = 0; j < d / 2; ++j) (*inv)[j] = std::pow(theta, -2.0 * j / d);
    *mult = 1.0;
    if (rs.type == core::RopeScalingType::kYarn) {
      auto dim_of = [&](double b) {
        return d * std::log(rs.original_max_position_embeddings / (b * 2 * std::numbers::pi)) /
               (2 * std::log(theta));
      };
      double lo = std::max(std::floor(dim_of(rs.beta_fast)), 0.0);
      double hi = std::min(std::ceil(dim_of(rs.beta_slow)), static_cast<double>(d - 1));
      if (hi == lo) hi += 0.001;
      for (int64_t j = 0; j < d / 2; ++j) {
        const double ramp = std::min(1.0, std::max(0.0, (j - lo) / (hi - lo)));
        (*inv)[j] = (*inv)[j] / rs.factor * ramp + (*inv)[j] * (1 - ramp);
      }
      auto ms = [&](double m) {
        return rs.factor <= 1 ? 1.0 : 0.1 * m * std::log(rs.factor) + 1.0;
      };
      *mult = ms(rs.mscale) / ms(rs.mscale_all_dim);
    }
  }

  // Rotates v[off .. off+d) at position `pos`; interleaved pairs (2j, 2j+1) or halves.
  void Rope(Vec& v, int64_t off, int64_t d, int64_t pos, bool interleaved) const {
    Vec inv;
    double mult;
    RopeParams(d, &inv, &mult);
    const double t = cfg_.rope_scaling.type == core::RopeScalingType::kLinear
                         ? pos / cfg_.rope_scaling.factor
                         : static_cast<double>(pos);
    for (int64_t j = 0; j < d / 2; ++j) {
      const int64_t i0 = interleaved ? off + 2 * j : off + j;
      const int64_t i1 = interleaved ? off + 2 * j + 1 : off + j + d / 2;
      const double c = std::cos(t * inv[j]) * mult, s = std::sin(t * inv[j]) * mult;
      const double a = v[i0], b = v[i1];
      v[i0] = a * c - b * s;
      v[i1] = b * c + a * s;
    }
  }

  double Scale() const {
    double s =
        1.0 / std::sqrt(static_cast<double>(
                  cfg_.IsMla() ? cfg_.qk_nope_head_dim + cfg_.qk_rope_head_dim : cfg_.head_dim));
    const auto& rs = cfg_.rope_scaling;
    if (rs.type == core::RopeScalingType::kYarn && rs.mscale_all_dim != 0 && rs.factor > 1) {
      const double m = 0.1 * rs.mscale_all_dim * std::log(rs.factor) + 1.0;
      s *= m * m;
    }
    return s;
  }

  // Causal attention over per-head q [T][H*dq], k [T][H*dq], v [T][H*dv].
  std::vector<Vec> Attend(const std::vector<Vec>& q, const std::vector<Vec>& k,
                          const std::vector<Vec>& v, int64_t H, int64_t dq, int64_t dv,
                          int64_t kv_group) const {
    const int64_t T = q.size();
    std::vector<Vec> out(T, Vec(H * dv, 0.0));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / kv_group;
        Vec s(t + 1);
        for (int64_t j = 0; j <= t; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < dq; ++i) acc += q[t][h * dq + i] * k[j][g * dq + i];
          s[j] = acc * Scale();
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j) {
          for (int64_t i = 0; i < dv; ++i) out[t][h * dv + i] += s[j] / sum * v[j][g * dv + i];
        }
      }
    }
    return out;
  }

  std::vector<Vec> Mla(const std::vector<Vec>& xn, const std::string& p) {
    const int64_t T = xn.size(), H = cfg_.num_attention_heads, Hd = cfg_.hidden_size;
    const int64_t nope = cfg_.qk_nope_head_dim, rd = cfg_.qk_rope_head_dim, vd = cfg_.v_head_dim;
    const int64_t rank = cfg_.kv_lora_rank, dq = nope + rd;
    std::vector<Vec> q(T), k(T, Vec(H * dq)), v(T, Vec(H * vd));
    for (int64_t t = 0; t < T; ++t) {
      if (cfg_.q_lora_rank > 0) {
        Vec qa = MatVec(W(p + "q_a_proj.weight"), cfg_.q_lora_rank, Hd, xn[t]);
        qa = Norm(qa, W(p + "q_a_layernorm.weight"));
        q[t] = MatVec(W(p + "q_b_proj.weight"), H * dq, cfg_.q_lora_rank, qa);
      } else {
        q[t] = MatVec(W(p + "q_proj.weight"), H * dq, Hd, xn[t]);
      }
      for (int64_t h = 0; h < H; ++h) Rope(q[t], h * dq + nope, rd, t, true);
      Vec ckv = MatVec(W(p + "kv_a_proj_with_mqa.weight"), rank + rd, Hd, xn[t]);
      Vec c(ckv.begin(), ckv.begin() + rank);
      Vec kpe(ckv.begin() + rank, ckv.end());
      c = Norm(c, W(p + "kv_a_layernorm.weight"));
      Rope(kpe, 0, rd, t, true);
      Vec kv = MatVec(W(p + "kv_b_proj.weight"), H * (nope + vd), rank, c);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < nope; ++i) k[t][h * dq + i] = kv[h * (nope + vd) + i];
        for (int64_t i = 0; i < rd; ++i) k[t][h * dq + nope + i] = kpe[i];
        for (int64_t i = 0; i < vd; ++i) v[t][h * vd + i] = kv[h * (nope + vd) + nope + i];
      }
    }
    std::vector<Vec> o = Attend(q, k, v, H, dq, vd, 1);
    std::vector<Vec> out(T);
    for (int64_t t = 0; t < T; ++t) out[t] = MatVec(W(p + "o_proj.weight"), Hd, H * vd, o[t]);
    return out;
  }

  std::vector<Vec> Mha(const std::vector<Vec>& xn, const std::string& p) {
    const int64_t T = xn.size(), H = cfg_.num_attention_heads, Hd = cfg_.hidden_size;
    const int64_t hd = cfg_.head_dim, kvh = cfg_.num_key_value_heads;
    std::vector<Vec> q(T), k(T), v(T);
    for (int64_t t = 0; t < T; ++t) {
      q[t] = MatVec(W(p + "q_proj.weight"), H * hd, Hd, xn[t]);
      k[t] = MatVec(W(p + "k_proj.weight"), kvh * hd, Hd, xn[t]);
      v[t] = MatVec(W(p + "v_proj.weight"), kvh * hd, Hd, xn[t]);
      for (int64_t h = 0; h < H; ++h) Rope(q[t], h * hd, hd, t, false);
      for (int64_t g = 0; g < kvh; ++g) Rope(k[t], g * hd, hd, t, false);
    }
    std::vector<Vec> o = Attend(q, k, v, H, hd, hd, H / kvh);
    std::vector<Vec> out(T);
    for (int64_t t = 0; t < T; ++t) out[t] = MatVec(W(p + "o_proj.weight"), Hd, H * hd, o[t]);
    return out;
  }

  Vec Ffn(const Vec& h, const std::string& p, int64_t inter) {
    const int64_t Hd = cfg_.hidden_size;
    Vec g = MatVec(W(p + "gate_proj.weight"), inter, Hd, h);
    Vec u = MatVec(W(p + "up_proj.weight"), inter, Hd, h);
    for (int64_t i = 0; i < inter; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    return MatVec(W(p + "down_proj.weight"), Hd, inter, g);
  }

  Vec Moe(const Vec& h, const std::string& p) {
    Vec y(cfg_.hidden_size, 0.0);
    for (auto [e, w] : Route(h, p)) {
      Vec o = Ffn(h, absl::StrCat(p, "experts.", e, "."), cfg_.moe_intermediate_size);
      for (size_t i = 0; i < y.size(); ++i) y[i] += w * o[i];
    }
    if (cfg_.n_shared_experts > 0) {
      Vec o = Ffn(h, p + "shared_experts.", cfg_.n_shared_experts * cfg_.moe_intermediate_size);
      for (size_t i = 0; i < y.size(); ++i) y[i] += o[i];
    }
    return y;
  }

  const core::ModelConfig& cfg_;
  const core::Checkpoint& ckpt_;
  std::map<std::string, Vec> cache_;
};

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_REFERENCE_MODEL_H_
