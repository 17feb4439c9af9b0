#include "core/dispatch_plan.h"

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

}  // namespace dmoe::core
