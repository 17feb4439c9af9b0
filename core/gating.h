// MoE gate: expert selection and weights from gate logits (docs/model.md, "MoE
// layer", steps 2-6). Every variant DeepSeek checkpoints use:
//   scoring softmax | sigmoid; selection greedy | group_limited_greedy
//   (group score = max) | noaux_tc (selection scores + e_score_correction_bias,
//   group score = sum of the two largest); norm_topk_prob; routed_scaling_factor.
// The bias only chooses experts; weights always come from the unbiased scores.
// Ties choose the lower expert (and the lower group) index.
//
// All arithmetic is fp32 or better; the result for a token depends only on that
// token's logits.
#ifndef DMOE_CORE_GATING_H_
#define DMOE_CORE_GATING_H_

#include <cstdint>
#include <span>
#include <vector>

#include "core/config.h"

namespace dmoe::core {

struct GateParams {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  TopkMethod method = TopkMethod::kGreedy;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;

  static GateParams FromConfig(const ModelConfig& cfg);
};

// Routing of a batch: top_k experts per token, in descending selection-score order.
struct GateResult {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  std::vector<int32_t> experts;  // [num_tokens, top_k]
  std::vector<float> weights;    // [num_tokens, top_k]
  std::vector<float> scores;     // [num_tokens, num_experts] unbiased scores (for load metrics)
};

// `logits`: [num_tokens, num_experts] fp32; `bias`: empty or [num_experts]
// (used only with noaux_tc).
GateResult SelectExperts(const GateParams& p, std::span<const float> logits, int64_t num_tokens,
                         std::span<const float> bias);

}  // namespace dmoe::core

#endif  // DMOE_CORE_GATING_H_
