// Status helpers shared by every dmoe component.
//
// Debian's Abseil (20220623) ships absl::Status/StatusOr but not the
// RETURN_IF_ERROR / ASSIGN_OR_RETURN macros; these are the project's versions.
#ifndef DMOE_CORE_STATUS_H_
#define DMOE_CORE_STATUS_H_

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define DMOE_STATUS_CONCAT_INNER_(a, b) a##b
#define DMOE_STATUS_CONCAT_(a, b) DMOE_STATUS_CONCAT_INNER_(a, b)

// Returns the status of `expr` from the enclosing function when it is not OK.
#define DMOE_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status dmoe_status_ = (expr);        \
    if (!dmoe_status_.ok()) return dmoe_status_; \
  } while (0)

// `lhs` = value of the StatusOr `rexpr`, or returns its error status.
// `lhs` may declare a variable: DMOE_ASSIGN_OR_RETURN(auto x, MakeX());
#define DMOE_ASSIGN_OR_RETURN(lhs, rexpr) \
  DMOE_ASSIGN_OR_RETURN_IMPL_(DMOE_STATUS_CONCAT_(dmoe_statusor_, __LINE__), lhs, rexpr)

#define DMOE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)  \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

namespace dmoe::core {

// Attaches a list of ids (little-endian int32) to a non-OK status as the
// payload `type_url`; OK statuses are returned unchanged.
absl::Status WithInt32Payload(absl::Status status, const char* type_url,
                              std::span<const int32_t> ids);
// The ids attached under `type_url`, or empty.
std::vector<int32_t> Int32Payload(const absl::Status& status, const char* type_url);

}  // namespace dmoe::core

#endif  // DMOE_CORE_STATUS_H_
