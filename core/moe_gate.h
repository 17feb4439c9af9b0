// Stage 1 of a MoE layer (core/moe.h): the gate. Router weights in fp32 as
// docs/model.md requires; Route scores every routed expert for each token and
// selects its experts and weights (SelectExperts, core/gating.h), per token and
// independent of the batch.
#ifndef DMOE_CORE_MOE_GATE_H_
#define DMOE_CORE_MOE_GATE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/gating.h"
#include "core/kernels/cpu/linear.h"
#include "core/safetensors.h"

namespace dmoe::core {

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

}  // namespace dmoe::core

#endif  // DMOE_CORE_MOE_GATE_H_
