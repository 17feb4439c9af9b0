// Loading one SwiGLU FFN from a checkpoint into an ExpertBackend, and the
// checkpoint names of a MoE layer's FFNs. Used by the model loader (routed,
// shared and dense FFNs), the expert server (its slots) and the benchmarks.
#ifndef DMOE_CORE_FFN_LOADER_H_
#define DMOE_CORE_FFN_LOADER_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "core/expert_backend.h"
#include "core/safetensors.h"

namespace dmoe::core {

// The checkpoint name prefix of an FFN: "model.layers.3.mlp.experts.7." for a
// routed expert, "model.layers.3.mlp.shared_experts." for kSharedFfn.
std::string FfnPrefix(int64_t layer, int32_t ffn_id);

// Reads the SwiGLU FFN at `prefix` (FfnPrefix) with width
// `intermediate` and hands it to `backend` as (layer, ffn_id).
absl::Status LoadFfnInto(const Checkpoint& ckpt, const std::string& prefix, int64_t hidden,
                         int64_t intermediate, int32_t layer, int32_t ffn_id,
                         ExpertBackend& backend);

}  // namespace dmoe::core

#endif  // DMOE_CORE_FFN_LOADER_H_
