#include "expert_service/internal/request_validation.h"

#include <cmath>
#include <cstdint>
#include <span>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace dmoe::expert::internal {

absl::StatusOr<common::WireDType> WireType(int dtype, const char* what) {
  switch (dtype) {
    case v1::ACTIVATION_DTYPE_BF16:
      return common::WireDType::kBF16;
    case v1::ACTIVATION_DTYPE_F32:
      return common::WireDType::kF32;
    case v1::ACTIVATION_DTYPE_F8_E4M3:
      return common::WireDType::kF8E4M3;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, " dtype ", dtype, " is not one of BF16, F32, F8_E4M3"));
  }
}

absl::StatusOr<common::WireDType> ValidateExpertRequest(const v1::ExpertRequest& c0,
                                                        const core::ModelConfig& cfg) {
  const int64_t layer = c0.layer();
  if (layer >= cfg.num_hidden_layers || !cfg.IsMoeLayer(layer)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
  }
  DMOE_ASSIGN_OR_RETURN(const common::WireDType in_type, WireType(c0.x().dtype(), "x"));
  if (c0.reply_dtype() != v1::ACTIVATION_DTYPE_UNSPECIFIED) {
    DMOE_RETURN_IF_ERROR(WireType(c0.reply_dtype(), "reply").status());
  }
  return in_type;
}

absl::Status ValidateExpertChunk(const v1::ExpertRequest& c0, const v1::ExpertRequest& c,
                                 const core::ModelConfig& cfg, common::WireDType in_type,
                                 const SlotTable& slots, const std::string& where) {
  const int64_t hidden = cfg.hidden_size;
  if (c.layer() != c0.layer() || c.placement_version() != c0.placement_version() ||
      c.x().dtype() != c0.x().dtype() || c.reply_dtype() != c0.reply_dtype() ||
      c.per_assignment_reply() != c0.per_assignment_reply()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where,
                     "layer, placement_version, x dtype, reply_dtype and "
                     "per_assignment_reply must equal chunk 0's"));
  }
  const int64_t rows = c.x().rows();
  if (c.x().cols() != hidden) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "x has ", c.x().cols(), " columns, expected hidden size ", hidden));
  }
  const auto& off = c.token_offsets();
  if (off.size() != rows + 1) {
    return absl::InvalidArgumentError(absl::StrCat(where, "token_offsets has ", off.size(),
                                                   " entries, expected x rows + 1 = ", rows + 1));
  }
  if (off[0] != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "token_offsets[0] is ", off[0], ", expected 0"));
  }
  for (int64_t t = 0; t < rows; ++t) {
    if (off[t + 1] < off[t]) {
      return absl::InvalidArgumentError(absl::StrCat(where, "token_offsets decrease at token ", t,
                                                     " (", off[t], " -> ", off[t + 1], ")"));
    }
  }
  const int64_t num_assignments = c.expert_ids_size();
  if (off[rows] != num_assignments || c.weights_size() != num_assignments) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "token_offsets end at ", off[rows], " but there are ", num_assignments,
                     " expert_ids and ", c.weights_size(), " weights"));
  }
  if (c.shared_duty_size() != 0 && c.shared_duty_size() != rows) {
    return absl::InvalidArgumentError(absl::StrCat(where, "shared_duty has ", c.shared_duty_size(),
                                                   " entries, expected 0 or ", rows));
  }
  if (cfg.n_shared_experts == 0) {
    for (bool d : c.shared_duty()) {
      if (d) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "shared duty requested but the model has no shared experts"));
      }
    }
  }
  for (int64_t a = 0; a < num_assignments; ++a) {
    if (!std::isfinite(c.weights(a))) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "weight ", a, " is not finite (", c.weights(a), ")"));
    }
  }
  {
    const std::span<const int32_t> ids(c.expert_ids().data(), c.expert_ids_size());
    absl::Status held =
        slots.CheckHeld(c.placement_version(), static_cast<int32_t>(c0.layer()), ids);
    if (!held.ok()) return absl::Status(held.code(), where + std::string(held.message()));
  }
  const uint64_t want = static_cast<uint64_t>(rows) * hidden * common::WireElementSize(in_type);
  if (c.x().data().size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(where, "x payload [", rows, ", ", hidden,
                                                   "] needs ", want, " bytes, got ",
                                                   c.x().data().size()));
  }
  return absl::OkStatus();
}

}  // namespace dmoe::expert::internal
