#include "core/moe_gate.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "core/layers.h"
#include "core/status.h"

namespace dmoe::core {

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

}  // namespace dmoe::core
