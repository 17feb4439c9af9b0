// absl::Status -> HTTP status, OpenAI error type/code and parameter, for the
// gateway's JSON errors.
#ifndef DMOE_GATEWAY_INTERNAL_HTTP_ERRORS_H_
#define DMOE_GATEWAY_INTERNAL_HTTP_ERRORS_H_

#include <string>

#include "absl/status/status.h"
#include "gateway/openai_protocol.h"

namespace dmoe::gateway::internal {

struct HttpError {
  int status = 500;
  std::string type;   // "invalid_request_error", "rate_limit_error", "server_error"
  std::string code;   // "" = null
  std::string param;  // "" = null
};

// INVALID_ARGUMENT/OUT_OF_RANGE/FAILED_PRECONDITION 400, NOT_FOUND 404,
// RESOURCE_EXHAUSTED 429, CANCELLED 499, UNIMPLEMENTED 501, UNAVAILABLE 503,
// DEADLINE_EXCEEDED 504; anything else from a router 502, else 500. The param
// is ParamOf(status); for a router's INVALID_ARGUMENT (`from_router`) it is
// read from the message, which names the field.
HttpError MapError(const absl::Status& status, ApiKind kind, bool from_router);

}  // namespace dmoe::gateway::internal

#endif  // DMOE_GATEWAY_INTERNAL_HTTP_ERRORS_H_
