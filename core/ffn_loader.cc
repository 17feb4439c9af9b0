#include "core/ffn_loader.h"

#include "absl/strings/str_cat.h"
#include "core/layers.h"
#include "core/status.h"

namespace dmoe::core {

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
