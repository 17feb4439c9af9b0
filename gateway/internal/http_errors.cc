#include "gateway/internal/http_errors.h"

#include "absl/strings/match.h"

namespace dmoe::gateway::internal {
namespace {

// The router's validation messages start with or name the field
// ("max_tokens must be ...", "prompt (12 tokens) + max_tokens (9) = ... exceeds
// the model's context", "prompt_tokens[3] = 99999 is outside the vocabulary").
std::string ParamFromRouterMessage(absl::string_view message, ApiKind kind) {
  const std::string prompt = kind == ApiKind::kChatCompletion ? "messages" : "prompt";
  if (absl::StrContains(message, "max_tokens")) return "max_tokens";
  if (absl::StrContains(message, "prompt")) return prompt;
  for (const char* p : {"temperature", "top_p", "top_k", "seed", "stop"}) {
    if (absl::StrContains(message, p)) return p;
  }
  return "";
}

}  // namespace

HttpError MapError(const absl::Status& status, ApiKind kind, bool from_router) {
  HttpError e;
  e.param = ParamOf(status);
  // From a router, FAILED_PRECONDITION is the cluster's state (an expert
  // server without the placement version a step needs, a switch in
  // progress), not the request's: 503, which clients retry.
  if (from_router && status.code() == absl::StatusCode::kFailedPrecondition) {
    e.status = 503;
    e.type = "server_error";
    e.code = "service_unavailable";
    return e;
  }
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      e.status = 400;
      e.type = "invalid_request_error";
      if (e.param.empty() && from_router) e.param = ParamFromRouterMessage(status.message(), kind);
      break;
    case absl::StatusCode::kNotFound:
      e.status = 404;
      e.type = "invalid_request_error";
      e.code = e.param == "model" ? "model_not_found" : "not_found";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.status = 429;
      e.type = "rate_limit_error";
      e.code = "rate_limit_exceeded";
      break;
    case absl::StatusCode::kCancelled:
      e.status = 499;
      e.type = "server_error";
      e.code = "cancelled";
      break;
    case absl::StatusCode::kUnimplemented:
      e.status = 501;
      e.type = "server_error";
      e.code = "not_implemented";
      break;
    case absl::StatusCode::kUnavailable:
      e.status = 503;
      e.type = "server_error";
      e.code = "service_unavailable";
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.status = 504;
      e.type = "server_error";
      e.code = "timeout";
      break;
    default:
      e.status = from_router ? 502 : 500;
      e.type = "server_error";
      e.code = from_router ? "upstream_error" : "internal_error";
      break;
  }
  return e;
}

}  // namespace dmoe::gateway::internal
