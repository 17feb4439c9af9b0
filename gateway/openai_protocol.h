// The OpenAI-compatible request and response bodies of /v1/completions and
// /v1/chat/completions.
//
// Parsing validates everything and never throws: a malformed body, a field of
// the wrong type or out of range, or an unsupported feature is
// INVALID_ARGUMENT whose message names the field, and whose payload
// (ParamOf) is the parameter's name as OpenAI reports it ("temperature",
// "messages[1].content"). A `model` other than the served one is NOT_FOUND
// (param "model"). Unknown fields are ignored, as OpenAI-compatible servers do.
//
// Prompts:
//  - /v1/completions: "prompt" is text ("..." or ["..."]), encoded with the
//    model's tokenizer (BOS added as its config says, unless
//    "add_special_tokens": false), or token ids ([ids] or [[ids]]); one prompt
//    per request.
//  - /v1/chat/completions: messages with text content (a string, or parts
//    [{"type": "text", "text"}] joined with "\n") are rendered with the model's
//    chat template ("add_generation_prompt", default true) and encoded without
//    adding special tokens (the template has them). Messages whose contents are
//    all token ids are concatenated in order with nothing added between them
//    (the client applied the template itself). Mixing the two is an error.
//  - "stop": strings (matched on the output text; see text_output.h) or token
//  ids.
// Text needs ParseOptions::tokenizer (and chat_template for messages); without
// it, text is refused with a message saying to send token ids. A chat template
// that cannot be rendered (an unsupported construct) is UNIMPLEMENTED naming
// it; one that raises (raise_exception) is INVALID_ARGUMENT with param
// "messages".
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
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace dmoe::gateway {

enum class ApiKind { kCompletion, kChatCompletion };

struct ParseOptions {
  std::string model_name = "dmoe";      // the only model served
  uint32_t max_tokens_limit = 1 << 20;  // upper bound of max_tokens; the router checks the context
  int max_json_depth = 64;
  // The model's tokenizer and chat template; null = token ids only. When the
  // tokenizer has no usable template, chat_template_error says why.
  const text::Tokenizer* tokenizer = nullptr;
  const text::ChatTemplate* chat_template = nullptr;
  std::string chat_template_error;
};

struct ParsedRequest {
  ApiKind kind = ApiKind::kCompletion;
  // prompt_tokens, max_tokens, sampling (temperature, top_p, top_k, seed),
  // stop_token_ids, ignore_eos; request_id is left to the caller.
  v1::GenerateRequest upstream;
  bool has_seed = false;  // false: the caller should draw one (OpenAI: unseeded = random)
  bool stream = false;
  std::vector<std::string> stop_strings;  // "stop" as text
  bool skip_special_tokens = true;        // in the output text (vLLM's default)
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

// The whole (non-streaming) response: `text` (empty without a tokenizer) and
// the token ids.
nlohmann::ordered_json ResponseJson(const CompletionMeta& meta, const std::vector<int32_t>& tokens,
                                    absl::string_view finish_reason, int64_t prompt_tokens,
                                    absl::string_view text = "");

// One streaming chunk carrying `token` and the text that became final with it
// (the first chat chunk also carries the assistant role).
nlohmann::ordered_json TokenChunkJson(const CompletionMeta& meta, int32_t token, bool first,
                                      absl::string_view text = "");
// The last chunk: no token, the rest of the text (held back until the end), the
// finish reason and the usage.
nlohmann::ordered_json FinalChunkJson(const CompletionMeta& meta, absl::string_view finish_reason,
                                      int64_t prompt_tokens, int64_t completion_tokens,
                                      absl::string_view text = "");

// {"error": {"message", "type", "param", "code"}}; empty param/code are null.
nlohmann::ordered_json ErrorJson(absl::string_view message, absl::string_view type,
                                 absl::string_view param, absl::string_view code);

// JSON text; invalid UTF-8 in strings is replaced, never thrown on.
std::string Dump(const nlohmann::ordered_json& j);

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_OPENAI_PROTOCOL_H_
