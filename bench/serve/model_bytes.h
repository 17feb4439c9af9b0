// What one token costs a model, from its checkpoint: the weight bytes a
// one-token decode step reads (the bandwidth bound of TPOT is these over the
// host's read bandwidth) and the weights it multiplies (prefill FLOPs are
// about 2 x these per token, before attention's own).
//
// Contract:
//   TokenCost(model_dir, elem_bytes)
//     from config.json and the safetensors headers (no weight is read): every
//     tensor counts whole, except routed experts (num_experts_per_tok of
//     n_routed_experts per MoE layer: the fraction top_k / n_routed of them),
//     the embedding table (one row, unless tied to the output head) and FP8
//     scale tensors (folded into the weights at load). Weights are held in the
//     compute type (`elem_bytes` each: 2 for bf16, 4 for f32) except the gates
//     and norms (fp32). head_weights: the output head's part of active_weights
//     (lm_head, or the embedding table when tied), which a prefill multiplies
//     only for the rows it samples.
#ifndef DMOE_BENCH_SERVE_MODEL_BYTES_H_
#define DMOE_BENCH_SERVE_MODEL_BYTES_H_

#include <string>

#include "absl/status/statusor.h"

namespace dmoe::bench::serve {

struct TokenCostInfo {
  double decode_bytes = 0;    // read by one decode step of one token
  double active_weights = 0;  // weights one token multiplies
  double head_weights = 0;    // of which the output head (prefill: only sampled rows)
  double total_weights = 0;   // every weight of the checkpoint
  int64_t vocab = 0;
  std::string summary;  // "V2-Lite-like, 4 layers, ..."
};

absl::StatusOr<TokenCostInfo> TokenCost(const std::string& model_dir, int elem_bytes);

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_MODEL_BYTES_H_
