// Stage 2 of a MoE layer (core/moe.h): the dispatch plan. The gate's choices
// as the token-major ("CSR") assignments an ExpertBackend computes: per token,
// its routed experts in gate order with the gate's weights, then (when the
// model has shared experts) the shared FFN with weight 1. This order is the
// order of the fp32 sum in every backend (core/expert_backend.h), so it fixes
// the bits of a token's result.
#ifndef DMOE_CORE_DISPATCH_PLAN_H_
#define DMOE_CORE_DISPATCH_PLAN_H_

#include <cstdint>
#include <vector>

#include "core/expert_backend.h"
#include "core/gating.h"

namespace dmoe::core {

struct DispatchPlan {
  std::vector<int32_t> token_offsets;  // [num_tokens + 1]
  std::vector<int32_t> ffn_ids;        // [num_assignments]
  std::vector<float> weights;          // [num_assignments]

  // The plan as a batch of `layer` over x [num_tokens, hidden] (views into
  // this plan and x, valid while both live unchanged).
  ExpertBatch AsBatch(int32_t layer, const float* x, int64_t num_tokens, int64_t hidden) const;
};

DispatchPlan MakeDispatchPlan(const GateResult& routing, bool with_shared);

}  // namespace dmoe::core

#endif  // DMOE_CORE_DISPATCH_PLAN_H_
