#include "core/status.h"

#include <cstring>
#include <string>

#include "absl/strings/cord.h"

namespace dmoe::core {

absl::Status WithInt32Payload(absl::Status status, const char* type_url,
                              std::span<const int32_t> ids) {
  if (status.ok()) return status;
  std::string bytes(ids.size() * sizeof(int32_t), '\0');
  if (!ids.empty()) std::memcpy(bytes.data(), ids.data(), bytes.size());
  status.SetPayload(type_url, absl::Cord(std::move(bytes)));
  return status;
}

std::vector<int32_t> Int32Payload(const absl::Status& status, const char* type_url) {
  std::vector<int32_t> out;
  auto payload = status.GetPayload(type_url);
  if (!payload.has_value()) return out;
  const std::string bytes(*payload);
  out.resize(bytes.size() / sizeof(int32_t));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(int32_t));
  return out;
}

}  // namespace dmoe::core
