// Validation of a Dispatch request (dmoe.v1.ExpertRequest) before the compute
// worker decodes its activations: pure checks of the message against the model
// config and the slot table, split out of ComputeWorker so that it can be
// tested and fuzzed alone. Every error is INVALID_ARGUMENT (or the slot
// table's code for experts not held) and names the field.
//
// Thread safety: the functions only read their arguments; SlotTable::CheckHeld
// is thread-safe.
#ifndef DMOE_EXPERT_SERVICE_INTERNAL_REQUEST_VALIDATION_H_
#define DMOE_EXPERT_SERVICE_INTERNAL_REQUEST_VALIDATION_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/wire.h"
#include "core/config.h"
#include "dmoe/v1/expert.pb.h"
#include "expert_service/internal/slot_table.h"

namespace dmoe::expert::internal {

// The codec type of a v1::ActivationDType value; `what` ("x", "reply") names
// the field in the error.
absl::StatusOr<common::WireDType> WireType(int dtype, const char* what);

// Checks what a request's chunk 0 fixes for all its chunks: a MoE layer of
// `cfg`, a known x dtype and reply dtype. Returns x's codec type.
absl::StatusOr<common::WireDType> ValidateExpertRequest(const v1::ExpertRequest& c0,
                                                        const core::ModelConfig& cfg);

// Checks chunk `c` of a request whose chunk 0 is `c0` (which passed
// ValidateExpertRequest; `c` may be `c0`): the fields chunk 0 fixes, x's
// shape [rows, cfg.hidden_size], token_offsets (rows + 1 entries from 0, not
// decreasing, ending at the number of expert_ids and weights), shared_duty,
// finite weights, experts held by `slots` at the request's placement
// version, and x's payload size for `in_type`. It does not decode x
// (common::UnpackActivations checks the values). Messages start with `where`
// ("chunk 1: ", or "" for an unchunked request).
absl::Status ValidateExpertChunk(const v1::ExpertRequest& c0, const v1::ExpertRequest& c,
                                 const core::ModelConfig& cfg, common::WireDType in_type,
                                 const SlotTable& slots, const std::string& where);

}  // namespace dmoe::expert::internal

#endif  // DMOE_EXPERT_SERVICE_INTERNAL_REQUEST_VALIDATION_H_
