// A MoE layer as the stages the disaggregated system puts on the wire:
//   gate -> dispatch plan (token -> experts, weights) -> expert compute -> combine.
//
// The gate (router weights, fp32 as docs/model.md requires) and the dispatch
// plan live here; expert compute goes through an ExpertBackend (in-process CPU or
// GPU, or remote expert servers); combine adds the backend's per-token sums to
// the residual stream.
#ifndef DMOE_CORE_MOE_H_
#define DMOE_CORE_MOE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/expert_backend.h"
#include "core/gating.h"
#include "core/kernels/cpu/linear.h"
#include "core/safetensors.h"

namespace dmoe::core {

// Token-major assignments for one layer's batch: the routed experts of each
// token in gate order, then (when requested) the shared FFN with weight 1.
struct DispatchPlan {
  std::vector<int32_t> token_offsets;  // [num_tokens + 1]
  std::vector<int32_t> ffn_ids;        // [num_assignments]
  std::vector<float> weights;          // [num_assignments]

  ExpertBatch AsBatch(int32_t layer, const float* x, int64_t num_tokens, int64_t hidden) const;
};

DispatchPlan MakeDispatchPlan(const GateResult& routing, bool with_shared);

class MoeGate {
 public:
  static absl::StatusOr<std::unique_ptr<MoeGate>> Load(const ModelConfig& cfg,
                                                       const Checkpoint& ckpt, int64_t layer);
  // x: [T, hidden] normalised hidden states.
  GateResult Route(const float* x, int64_t num_tokens);
  const GateParams& params() const { return params_; }
  // Added to the router logits before scoring ([n_routed] or empty): a
  // testing knob that skews routing on purpose (balance tests, benchmarks).
  void set_logit_bias_for_testing(std::vector<float> bias) { test_bias_ = std::move(bias); }
  size_t WeightBytes() const { return weight_.weight_bytes() + bias_.size() * sizeof(float); }

 private:
  GateParams params_;
  PackedLinear weight_;      // [n_routed, hidden], fp32
  std::vector<float> bias_;  // [n_routed] (noaux_tc) or empty
  std::vector<float> logits_;
  std::vector<float> test_bias_;
};

// The checkpoint name prefix of an FFN: "model.layers.3.mlp.experts.7." for a
// routed expert, "model.layers.3.mlp.shared_experts." for kSharedFfn.
std::string FfnPrefix(int64_t layer, int32_t ffn_id);

// Reads the SwiGLU FFN at `prefix` (FfnPrefix) with width
// `intermediate` and hands it to `backend` as (layer, ffn_id).
absl::Status LoadFfnInto(const Checkpoint& ckpt, const std::string& prefix, int64_t hidden,
                         int64_t intermediate, int32_t layer, int32_t ffn_id,
                         ExpertBackend& backend);

}  // namespace dmoe::core

#endif  // DMOE_CORE_MOE_H_
