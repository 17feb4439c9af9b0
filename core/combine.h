// Stage 4 of a MoE layer (core/moe.h): combine. The expert backend returns,
// per token, the weighted sum of its FFN outputs (or, per assignment, the
// weighted rows c_a that SumAssignmentRows adds in the one fixed order of
// core/expert_backend.h); combine adds that sum to the residual stream and
// counts each routed assignment in the per-expert load that placement uses.
#ifndef DMOE_CORE_COMBINE_H_
#define DMOE_CORE_COMBINE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "core/gating.h"

namespace dmoe::core {

// Adds per-assignment rows (ExpertBatch::per_assignment_out) of each token in
// order into out[t] = ((c_0 + c_1) + ...), the sum a backend computes itself:
// rows[a] for a in [token_offsets[t], token_offsets[t+1]); a token with none
// gets zeros. `rows` may point anywhere (null only for tokens without rows).
void SumAssignmentRows(std::span<const int32_t> token_offsets, std::span<const float* const> rows,
                       int64_t hidden, float* out);

// residual[i] += ffn_out[i] for every i (fp32, no FMA); the spans have the
// same length ([tokens * hidden]).
void AddToResidual(std::span<float> residual, std::span<const float> ffn_out);

// ++load[e] for every routed expert e the gate chose (routing.experts); `load`
// has one counter per routed expert of the layer.
void CountExpertLoad(const GateResult& routing, std::span<int64_t> load);

}  // namespace dmoe::core

#endif  // DMOE_CORE_COMBINE_H_
