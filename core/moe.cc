#include "core/moe.h"

#include "absl/strings/str_cat.h"
#include "core/layers.h"
#include "core/status.h"

namespace dmoe::core {

ExpertBatch DispatchPlan::AsBatch(int32_t layer, const float* x, int64_t num_tokens,
                                  int64_t hidden) const {
  ExpertBatch b;
  b.layer = layer;
  b.num_tokens = num_tokens;
  b.hidden = hidden;
  b.x = x;
  b.token_offsets = token_offsets;
  b.ffn_ids = ffn_ids;
  b.weights = weights;
  return b;
}

DispatchPlan MakeDispatchPlan(const GateResult& routing, bool with_shared) {
  DispatchPlan plan;
  const int64_t T = routing.num_tokens, K = routing.top_k;
  const int64_t per_token = K + (with_shared ? 1 : 0);
  plan.token_offsets.resize(T + 1);
  plan.ffn_ids.reserve(T * per_token);
  plan.weights.reserve(T * per_token);
  for (int64_t t = 0; t < T; ++t) {
    plan.token_offsets[t] = static_cast<int32_t>(t * per_token);
    for (int64_t k = 0; k < K; ++k) {
      plan.ffn_ids.push_back(routing.experts[t * K + k]);
      plan.weights.push_back(routing.weights[t * K + k]);
    }
    if (with_shared) {
      plan.ffn_ids.push_back(kSharedFfn);
      plan.weights.push_back(1.0f);
    }
  }
  plan.token_offsets[T] = static_cast<int32_t>(T * per_token);
  return plan;
}

absl::StatusOr<std::unique_ptr<MoeGate>> MoeGate::Load(const ModelConfig& cfg,
                                                       const Checkpoint& ckpt, int64_t layer) {
  auto g = std::make_unique<MoeGate>();
  g->params_ = GateParams::FromConfig(cfg);
  const std::string p = absl::StrCat("model.layers.", layer, ".mlp.gate.");
  DMOE_ASSIGN_OR_RETURN(g->weight_, LoadLinear(ckpt, p + "weight", cfg.n_routed_experts,
                                               cfg.hidden_size, ComputeType::kF32));
  if (cfg.topk_method == TopkMethod::kNoauxTc) {
    DMOE_ASSIGN_OR_RETURN(g->bias_,
                          LoadVector(ckpt, p + "e_score_correction_bias", cfg.n_routed_experts));
  }
  return g;
}

GateResult MoeGate::Route(const float* x, int64_t num_tokens) {
  logits_.resize(num_tokens * params_.num_experts);
  weight_.Forward(x, num_tokens, logits_.data());
  if (!test_bias_.empty()) {
    const int64_t E = params_.num_experts;
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int64_t e = 0; e < E; ++e) logits_[t * E + e] += test_bias_[e];
    }
  }
  return SelectExperts(params_, logits_, num_tokens, bias_);
}

std::string FfnPrefix(int64_t layer, int32_t ffn_id) {
  return ffn_id == kSharedFfn ? absl::StrCat("model.layers.", layer, ".mlp.shared_experts.")
                              : absl::StrCat("model.layers.", layer, ".mlp.experts.", ffn_id, ".");
}

absl::Status LoadFfnInto(const Checkpoint& ckpt, const std::string& prefix, int64_t hidden,
                         int64_t intermediate, int32_t layer, int32_t ffn_id,
                         ExpertBackend& backend) {
  const int64_t in_shape[2] = {intermediate, hidden};
  const int64_t out_shape[2] = {hidden, intermediate};
  const size_t n = static_cast<size_t>(intermediate) * hidden;
  float* gate = LoadBuffer(1, n);
  float* up = LoadBuffer(2, n);
  float* down = LoadBuffer(3, n);
  DMOE_RETURN_IF_ERROR(ckpt.ReadF32(prefix + "gate_proj.weight", in_shape, gate));
  DMOE_RETURN_IF_ERROR(ckpt.ReadF32(prefix + "up_proj.weight", in_shape, up));
  DMOE_RETURN_IF_ERROR(ckpt.ReadF32(prefix + "down_proj.weight", out_shape, down));
  ckpt.Release(prefix + "gate_proj.weight");
  ckpt.Release(prefix + "up_proj.weight");
  ckpt.Release(prefix + "down_proj.weight");
  FfnWeights w;
  w.hidden = hidden;
  w.intermediate = intermediate;
  w.gate = {gate, n};
  w.up = {up, n};
  w.down = {down, n};
  return backend.LoadFfn(layer, ffn_id, w);
}

}  // namespace dmoe::core
