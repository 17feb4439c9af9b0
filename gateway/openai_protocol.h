// The OpenAI-compatible request and response bodies of /v1/completions and
// /v1/chat/completions, for token-id prompts (the tokenizer is not in the
// gateway yet).
//
// Parsing validates everything and never throws: a malformed body, a field of
// the wrong type or out of range, or an unsupported feature is
// INVALID_ARGUMENT whose message names the field, and whose payload
// (ParamOf) is the parameter's name as OpenAI reports it ("temperature",
// "messages[1].content"). A `model` other than the served one is NOT_FOUND
// (param "model"). Unknown fields are ignored, as OpenAI-compatible servers do.
//
// Prompts:
//  - /v1/completions: "prompt" is [ids] or [[ids]] (one prompt per request).
//  - /v1/chat/completions: every message's "content" is [ids]; the contents are
//    concatenated in order, with nothing added between them, so the client
//    sends the chat template's tokens itself (roles are checked, not encoded).
// Text (strings) in a prompt, a message or "stop" is refused with a message
// saying to send token ids.
#ifndef DMOE_GATEWAY_OPENAI_PROTOCOL_H_
#define DMOE_GATEWAY_OPENAI_PROTOCOL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "dmoe/v1/router.pb.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway {

enum class ApiKind { kCompletion, kChatCompletion };

struct ParseOptions {
  std::string model_name = "dmoe";      // the only model served
  uint32_t max_tokens_limit = 1 << 20;  // upper bound of max_tokens; the router checks the context
  int max_json_depth = 64;
};

struct ParsedRequest {
  ApiKind kind = ApiKind::kCompletion;
  // prompt_tokens, max_tokens, sampling (temperature, top_p, top_k, seed),
  // stop_token_ids, ignore_eos; request_id is left to the caller.
  v1::GenerateRequest upstream;
  bool has_seed = false;  // false: the caller should draw one (OpenAI: unseeded = random)
  bool stream = false;
};

absl::StatusOr<ParsedRequest> ParseGenerateRequest(absl::string_view body, ApiKind kind,
                                                   const ParseOptions& options);

// The parameter an INVALID_ARGUMENT / NOT_FOUND from ParseGenerateRequest is
// about ("" when none).
std::string ParamOf(const absl::Status& status);
absl::Status InvalidParam(absl::string_view param, absl::string_view message);

// Responses. `created` is Unix seconds.
struct CompletionMeta {
  ApiKind kind = ApiKind::kCompletion;
  std::string id;
  int64_t created = 0;
  std::string model;
};

nlohmann::ordered_json UsageJson(int64_t prompt_tokens, int64_t completion_tokens);

// The whole (non-streaming) response.
nlohmann::ordered_json ResponseJson(const CompletionMeta& meta, const std::vector<int32_t>& tokens,
                                    absl::string_view finish_reason, int64_t prompt_tokens);

// One streaming chunk carrying `token` (the first chat chunk also carries the
// assistant role).
nlohmann::ordered_json TokenChunkJson(const CompletionMeta& meta, int32_t token, bool first);
// The last chunk: no token, the finish reason and the usage.
nlohmann::ordered_json FinalChunkJson(const CompletionMeta& meta, absl::string_view finish_reason,
                                      int64_t prompt_tokens, int64_t completion_tokens);

// {"error": {"message", "type", "param", "code"}}; empty param/code are null.
nlohmann::ordered_json ErrorJson(absl::string_view message, absl::string_view type,
                                 absl::string_view param, absl::string_view code);

// JSON text; invalid UTF-8 in strings is replaced, never thrown on.
std::string Dump(const nlohmann::ordered_json& j);

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_OPENAI_PROTOCOL_H_
