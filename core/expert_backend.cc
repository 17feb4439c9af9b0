#include "core/expert_backend.h"

#include "core/status.h"

namespace dmoe::core {
namespace {

constexpr char kFailedTokensUrl[] = "type.dmoe.dev/dmoe.FailedTokens";

}  // namespace

absl::StatusOr<uint64_t> ExpertBackend::Submit(const ExpertBatch& batch, float* out) {
  DMOE_RETURN_IF_ERROR(Compute(batch, out));
  return uint64_t{0};
}

absl::Status ExpertBackend::Await(uint64_t /*ticket*/) { return absl::OkStatus(); }

void ExpertBackend::Cancel(uint64_t /*ticket*/) {}

absl::Status WithFailedTokens(absl::Status status, std::span<const int32_t> tokens) {
  return WithInt32Payload(std::move(status), kFailedTokensUrl, tokens);
}

std::vector<int32_t> FailedTokens(const absl::Status& status) {
  return Int32Payload(status, kFailedTokensUrl);
}

}  // namespace dmoe::core
