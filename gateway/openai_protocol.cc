#include "gateway/openai_protocol.h"

#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace dmoe::gateway {
namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr char kParamPayload[] = "type.googleapis.com/dmoe.gateway.Param";
constexpr char kTextPrompt[] =
    "text prompts need the model's tokenizer: start dmoe-gateway with "
    "--tokenizer DIR, or send "
    "token ids";
constexpr char kTextStop[] =
    "stop strings need the model's tokenizer (dmoe-gateway --tokenizer DIR); "
    "or send stop token "
    "ids (an integer or a list of integers)";
constexpr int kMaxStopIds = 1024;
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 1024;

// Deepest nesting of arrays/objects, counted without parsing (nlohmann's
// parser is iterative, but a body of a million '[' is no request).
int NestingDepth(absl::string_view s) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      max_depth = std::max(max_depth, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return max_depth;
}

std::string TypeName(const json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number_float()) return "number";
  return v.type_name();  // "null", "boolean", "string", "array", "object"
}

absl::Status WrongType(absl::string_view param, absl::string_view want, const json& got) {
  return InvalidParam(param, absl::StrCat(param, " must be ", want, ", got ", TypeName(got)));
}

// The field, or nullptr when it is absent or null (null = default, as in
// OpenAI).
const json* Field(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

// Every top-level boolean field the gateway reads, checked up front and alike
// (null = default, anything else but true/false is named), whichever endpoint
// and prompt form: add_special_tokens is read only for text prompts and
// add_generation_prompt only for text messages, but a wrong type is an error
// on every path. The readers below then only get<bool>().
// stream_options.include_usage is checked the same way in CheckUnsupported.
constexpr const char* kBooleanFields[] = {"stream", "ignore_eos",         "skip_special_tokens",
                                          "echo",   "add_special_tokens", "add_generation_prompt"};

absl::Status CheckBooleans(const json& body) {
  for (const char* name : kBooleanFields) {
    if (const json* b = Field(body, name); b != nullptr && !b->is_boolean()) {
      return WrongType(name, "a boolean", *b);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> IntIn(const json& v, absl::string_view param, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) return WrongType(param, "an integer", v);
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi)) {
    return InvalidParam(
        param, absl::StrCat(param, " must be in [", lo, ", ", hi, "], got ", v.get<uint64_t>()));
  }
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) {
    return InvalidParam(param, absl::StrCat(param, " must be in [", lo, ", ", hi, "], got ", x));
  }
  return x;
}

absl::StatusOr<double> Number(const json& v, absl::string_view param) {
  if (!v.is_number()) return WrongType(param, "a number", v);
  const double x = v.get<double>();
  if (!std::isfinite(x)) return InvalidParam(param, absl::StrCat(param, " must be finite"));
  return x;
}

absl::Status AppendTokenIds(const json& arr, absl::string_view param, absl::string_view text_error,
                            google::protobuf::RepeatedField<int32_t>* out) {
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& v = arr[i];
    const std::string at = absl::StrCat(param, "[", i, "]");
    if (v.is_string()) return InvalidParam(param, absl::StrCat(param, ": ", text_error));
    // The message names the element; the param stays the field (as OpenAI's).
    if (!v.is_number_integer()) {
      return InvalidParam(param, WrongType(at, "a token id (integer)", v).message());
    }
    absl::StatusOr<int64_t> id = IntIn(v, at, 0, std::numeric_limits<int32_t>::max());
    if (!id.ok()) return InvalidParam(param, id.status().message());
    out->Add(static_cast<int32_t>(*id));
  }
  return absl::OkStatus();
}

absl::Status ParsePrompt(const json& body, const ParseOptions& options, v1::GenerateRequest* up) {
  const json* p = Field(body, "prompt");
  if (p == nullptr) {
    return InvalidParam("prompt", "prompt is required (text or a list of token ids)");
  }
  const json* text = nullptr;
  if (p->is_string()) {
    text = p;
  } else if (p->is_array() && !p->empty() && (*p)[0].is_string()) {
    if (p->size() != 1) {
      return InvalidParam("prompt", absl::StrCat("prompt: one prompt per request for now, got ",
                                                 p->size(), "; send them as separate requests"));
    }
    text = &(*p)[0];
  }
  if (text != nullptr) {
    if (options.tokenizer == nullptr) {
      return InvalidParam("prompt", absl::StrCat("prompt: ", kTextPrompt));
    }
    bool add_special = true;  // a boolean: CheckBooleans
    if (const json* a = Field(body, "add_special_tokens")) {
      add_special = a->get<bool>();
    }
    absl::StatusOr<std::vector<int32_t>> ids =
        options.tokenizer->Encode(text->get<std::string>(), add_special);
    if (!ids.ok()) return InvalidParam("prompt", absl::StrCat("prompt: ", ids.status().message()));
    up->mutable_prompt_tokens()->Add(ids->begin(), ids->end());
    if (up->prompt_tokens_size() == 0) {
      return InvalidParam("prompt", "prompt is empty: give some text or at least one token id");
    }
    return absl::OkStatus();
  }
  if (!p->is_array()) return WrongType("prompt", "text or a list of token ids", *p);
  const json* ids = p;
  if (!p->empty() && (*p)[0].is_array()) {
    if (p->size() != 1) {
      return InvalidParam("prompt", absl::StrCat("prompt: one prompt per request for now, got ",
                                                 p->size(), "; send them as separate requests"));
    }
    ids = &(*p)[0];
  }
  if (absl::Status st = AppendTokenIds(*ids, "prompt", kTextPrompt, up->mutable_prompt_tokens());
      !st.ok()) {
    return st;
  }
  if (up->prompt_tokens_size() == 0) {
    return InvalidParam("prompt", "prompt is empty: give at least one token id");
  }
  return absl::OkStatus();
}

// The text of a message's content: a string, or text parts joined with "\n"
// (as vLLM joins them for string templates). nullopt: not text (token ids).
absl::StatusOr<std::optional<std::string>> ContentText(const json& content,
                                                       const std::string& param) {
  if (content.is_string()) return std::optional<std::string>(content.get<std::string>());
  if (!content.is_array() || content.empty() || !content[0].is_object()) {
    return std::optional<std::string>();
  }
  std::string text;
  for (size_t k = 0; k < content.size(); ++k) {
    const json& part = content[k];
    const std::string at = absl::StrCat(param, "[", k, "]");
    if (!part.is_object()) return WrongType(at, "a content part object", part);
    const json* type = Field(part, "type");
    if (type == nullptr || !type->is_string() || type->get<std::string>() != "text") {
      return InvalidParam(param,
                          absl::StrCat(at, ": only {\"type\": \"text\"} parts are supported"));
    }
    const json* t = Field(part, "text");
    if (t == nullptr || !t->is_string())
      return InvalidParam(param, absl::StrCat(at, ".text must be a string"));
    if (k > 0) text += "\n";
    text += t->get<std::string>();
  }
  return std::optional<std::string>(std::move(text));
}

absl::Status ParseMessages(const json& body, const ParseOptions& options, v1::GenerateRequest* up) {
  const json* m = Field(body, "messages");
  if (m == nullptr) return InvalidParam("messages", "messages is required (a list of messages)");
  if (!m->is_array()) return WrongType("messages", "a list of messages", *m);
  if (m->empty()) return InvalidParam("messages", "messages is empty: give at least one message");
  ojson chat = ojson::array();  // text messages, for the chat template
  int token_messages = 0;
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string at = absl::StrCat("messages[", i, "]");
    if (!msg.is_object()) return WrongType(at, "an object", msg);
    const json* role = Field(msg, "role");
    const std::string role_param = at + ".role";
    if (role == nullptr) return InvalidParam(role_param, role_param + " is required");
    if (!role->is_string()) return WrongType(role_param, "a string", *role);
    const std::string r = role->get<std::string>();
    if (r != "system" && r != "user" && r != "assistant" && r != "developer" && r != "tool") {
      return InvalidParam(role_param, absl::StrCat(role_param,
                                                   " must be one of system, developer, user, "
                                                   "assistant, tool; got '",
                                                   r, "'"));
    }
    const std::string content_param = at + ".content";
    const json* content = Field(msg, "content");
    if (content == nullptr) {
      return InvalidParam(content_param,
                          content_param + " is required (text or a list of token ids)");
    }
    absl::StatusOr<std::optional<std::string>> text = ContentText(*content, content_param);
    if (!text.ok()) return text.status();
    if (text->has_value()) {
      if (options.tokenizer == nullptr) {
        return InvalidParam(content_param,
                            absl::StrCat(content_param,
                                         ": text content needs the model's tokenizer and chat "
                                         "template: start dmoe-gateway with --tokenizer DIR, or "
                                         "send token ids with the chat template already applied"));
      }
      ojson one;
      one["role"] = r;
      one["content"] = **text;
      chat.push_back(std::move(one));
      continue;
    }
    if (!content->is_array()) {
      return WrongType(content_param, "text or a list of token ids", *content);
    }
    ++token_messages;
    if (absl::Status st =
            AppendTokenIds(*content, content_param, kTextPrompt, up->mutable_prompt_tokens());
        !st.ok()) {
      return st;
    }
  }
  if (!chat.empty() && token_messages > 0) {
    return InvalidParam("messages",
                        "messages mix text and token-id contents: send all as text (the chat "
                        "template is applied) or all as token ids");
  }
  if (!chat.empty()) {
    if (options.chat_template == nullptr) {
      return absl::UnimplementedError(absl::StrCat(
          "messages: the model has no usable chat template",
          options.chat_template_error.empty() ? "" : ": ", options.chat_template_error));
    }
    bool add_generation_prompt = true;  // a boolean: CheckBooleans
    if (const json* a = Field(body, "add_generation_prompt")) {
      add_generation_prompt = a->get<bool>();
    }
    ojson context;
    context["messages"] = std::move(chat);
    context["add_generation_prompt"] = add_generation_prompt;
    context["bos_token"] = options.tokenizer->bos_token();
    context["eos_token"] = options.tokenizer->eos_token();
    absl::StatusOr<std::string> prompt = options.chat_template->Render(context);
    if (!prompt.ok()) {
      if (absl::StartsWith(prompt.status().message(), "chat template raised")) {
        return InvalidParam("messages", absl::StrCat("messages: ", prompt.status().message()));
      }
      return absl::UnimplementedError(absl::StrCat("the model's chat template cannot be rendered: ",
                                                   prompt.status().message()));
    }
    absl::StatusOr<std::vector<int32_t>> ids = options.tokenizer->Encode(*prompt, false);
    if (!ids.ok())
      return InvalidParam("messages", absl::StrCat("messages: ", ids.status().message()));
    up->mutable_prompt_tokens()->Add(ids->begin(), ids->end());
  }
  if (up->prompt_tokens_size() == 0) {
    return InvalidParam("messages", "messages hold no token ids: give at least one");
  }
  return absl::OkStatus();
}

absl::Status ParseStop(const json& body, const ParseOptions& options, ParsedRequest* out) {
  v1::GenerateRequest* up = &out->upstream;
  const json* s = Field(body, "stop");
  if (s == nullptr) return absl::OkStatus();
  const bool strings = s->is_string() || (s->is_array() && !s->empty() && (*s)[0].is_string());
  if (strings) {
    if (options.tokenizer == nullptr)
      return InvalidParam("stop", absl::StrCat("stop: ", kTextStop));
    std::vector<json> items = s->is_string() ? std::vector<json>{*s} : s->get<std::vector<json>>();
    if (items.size() > kMaxStopStrings) {
      return InvalidParam("stop", absl::StrCat("stop: at most ", kMaxStopStrings,
                                               " stop strings, got ", items.size()));
    }
    for (size_t i = 0; i < items.size(); ++i) {
      const std::string at = absl::StrCat("stop[", i, "]");
      if (!items[i].is_string()) {
        return InvalidParam("stop", absl::StrCat(at, " must be a string like the others, got ",
                                                 TypeName(items[i])));
      }
      std::string v = items[i].get<std::string>();
      if (v.empty()) return InvalidParam("stop", absl::StrCat(at, " is empty"));
      if (v.size() > kMaxStopStringBytes) {
        return InvalidParam("stop",
                            absl::StrCat(at, " is longer than ", kMaxStopStringBytes, " bytes"));
      }
      out->stop_strings.push_back(std::move(v));
    }
    return absl::OkStatus();
  }
  if (s->is_number_integer()) {
    absl::StatusOr<int64_t> id = IntIn(*s, "stop", 0, std::numeric_limits<int32_t>::max());
    if (!id.ok()) return id.status();
    up->add_stop_token_ids(static_cast<int32_t>(*id));
    return absl::OkStatus();
  }
  if (!s->is_array()) return WrongType("stop", "a string, a token id or a list of either", *s);
  if (s->size() > kMaxStopIds) {
    return InvalidParam("stop",
                        absl::StrCat("stop: at most ", kMaxStopIds, " token ids, got ", s->size()));
  }
  return AppendTokenIds(*s, "stop", kTextStop, up->mutable_stop_token_ids());
}

// Fields of OpenAI's API this gateway does not implement: accepted only with
// their neutral value, refused otherwise (never silently ignored).
// (CheckBooleans has checked echo's type.)
absl::Status CheckUnsupported(const json& body, ApiKind kind) {
  if (const json* n = Field(body, "n")) {
    absl::StatusOr<int64_t> v = IntIn(*n, "n", 1, 128);
    if (!v.ok()) return v.status();
    if (*v != 1) return InvalidParam("n", "n: only n=1 is supported for now");
  }
  if (const json* b = Field(body, "best_of")) {
    absl::StatusOr<int64_t> v = IntIn(*b, "best_of", 1, 128);
    if (!v.ok()) return v.status();
    if (*v != 1) return InvalidParam("best_of", "best_of: only best_of=1 is supported for now");
  }
  if (const json* e = Field(body, "echo"); e != nullptr && e->get<bool>()) {
    return InvalidParam("echo", "echo: not supported for now");
  }
  if (const json* l = Field(body, "logprobs")) {
    const bool off = (l->is_boolean() && !l->get<bool>());
    if (!l->is_boolean() && !l->is_number_integer()) {
      return WrongType("logprobs", kind == ApiKind::kChatCompletion ? "a boolean" : "an integer",
                       *l);
    }
    if (!off) return InvalidParam("logprobs", "logprobs: not supported for now");
  }
  if (const json* t = Field(body, "top_logprobs")) {
    if (!t->is_number_integer()) return WrongType("top_logprobs", "an integer", *t);
    return InvalidParam("top_logprobs", "top_logprobs: not supported for now");
  }
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    if (const json* p = Field(body, name)) {
      absl::StatusOr<double> v = Number(*p, name);
      if (!v.ok()) return v.status();
      if (*v != 0.0)
        return InvalidParam(name, absl::StrCat(name, ": not supported for now (use 0)"));
    }
  }
  if (const json* b = Field(body, "logit_bias")) {
    if (!b->is_object()) return WrongType("logit_bias", "an object", *b);
    if (!b->empty()) return InvalidParam("logit_bias", "logit_bias: not supported for now");
  }
  if (const json* s = Field(body, "suffix")) {
    if (!s->is_string()) return WrongType("suffix", "a string", *s);
    if (!s->get<std::string>().empty()) return InvalidParam("suffix", "suffix: not supported");
  }
  if (const json* t = Field(body, "tools")) {
    if (!t->is_array()) return WrongType("tools", "a list", *t);
    if (!t->empty()) return InvalidParam("tools", "tools: tool calling is not supported for now");
  }
  if (const json* r = Field(body, "response_format")) {
    if (!r->is_object()) return WrongType("response_format", "an object", *r);
    const json* type = Field(*r, "type");
    if (type != nullptr && !(type->is_string() && type->get<std::string>() == "text")) {
      return InvalidParam("response_format",
                          "response_format: only {\"type\": \"text\"} is supported for now");
    }
  }
  if (const json* u = Field(body, "user")) {
    if (!u->is_string()) return WrongType("user", "a string", *u);
  }
  if (const json* o = Field(body, "stream_options")) {
    if (!o->is_object()) return WrongType("stream_options", "an object", *o);
    if (const json* iu = Field(*o, "include_usage"); iu != nullptr && !iu->is_boolean()) {
      return WrongType("stream_options.include_usage", "a boolean", *iu);
    }
  }
  return absl::OkStatus();
}

absl::Status ParseSampling(const json& body, ApiKind kind, const ParseOptions& options,
                           ParsedRequest* out) {
  v1::GenerateRequest& up = out->upstream;
  // max_tokens (default 16, as OpenAI's completions); chat's newer
  // max_completion_tokens wins when both are given.
  const char* max_name = "max_tokens";
  const json* max = Field(body, "max_tokens");
  if (kind == ApiKind::kChatCompletion) {
    if (const json* mct = Field(body, "max_completion_tokens")) {
      max = mct;
      max_name = "max_completion_tokens";
    }
  }
  up.set_max_tokens(16);
  if (max != nullptr) {
    absl::StatusOr<int64_t> v = IntIn(*max, max_name, 1, options.max_tokens_limit);
    if (!v.ok()) return v.status();
    up.set_max_tokens(static_cast<uint32_t>(*v));
  }
  v1::SamplingOptions& s = *up.mutable_sampling();
  s.set_temperature(1.0f);
  if (const json* t = Field(body, "temperature")) {
    absl::StatusOr<double> v = Number(*t, "temperature");
    if (!v.ok()) return v.status();
    if (*v < 0.0 || *v > 2.0) {
      return InvalidParam("temperature", absl::StrCat("temperature must be in [0, 2], got ", *v));
    }
    s.set_temperature(static_cast<float>(*v));
  }
  s.set_top_p(1.0f);
  if (const json* p = Field(body, "top_p")) {
    absl::StatusOr<double> v = Number(*p, "top_p");
    if (!v.ok()) return v.status();
    if (!(*v > 0.0 && *v <= 1.0)) {
      return InvalidParam("top_p", absl::StrCat("top_p must be in (0, 1], got ", *v));
    }
    s.set_top_p(static_cast<float>(*v));
  }
  if (const json* k = Field(body, "top_k")) {  // extension (vLLM): -1 or 0 = off
    absl::StatusOr<int64_t> v = IntIn(*k, "top_k", -1, std::numeric_limits<int32_t>::max());
    if (!v.ok()) return v.status();
    s.set_top_k(*v < 0 ? 0 : static_cast<uint32_t>(*v));
  }
  if (const json* seed = Field(body, "seed")) {
    if (!seed->is_number_integer()) return WrongType("seed", "an integer", *seed);
    // Any 64-bit integer; negative seeds wrap (the router takes a uint64).
    s.set_seed(seed->is_number_unsigned() ? seed->get<uint64_t>()
                                          : static_cast<uint64_t>(seed->get<int64_t>()));
    out->has_seed = true;
  }
  // Booleans (checked by CheckBooleans); ignore_eos and skip_special_tokens
  // are extensions (vLLM).
  if (const json* ie = Field(body, "ignore_eos")) {
    up.set_ignore_eos(ie->get<bool>());
  }
  if (const json* st = Field(body, "stream")) out->stream = st->get<bool>();
  if (const json* sst = Field(body, "skip_special_tokens")) {
    out->skip_special_tokens = sst->get<bool>();
  }
  return ParseStop(body, options, out);
}

absl::StatusOr<ParsedRequest> ParseImpl(absl::string_view text, ApiKind kind,
                                        const ParseOptions& options) {
  if (NestingDepth(text) > options.max_json_depth) {
    return InvalidParam(
        "", absl::StrCat("request body nests deeper than ", options.max_json_depth, " levels"));
  }
  json body;
  try {
    body = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {  // parse_error; out_of_range for 1e400
    return InvalidParam("", absl::StrCat("request body is not valid JSON: ", e.what()));
  }
  if (!body.is_object()) {
    return InvalidParam("",
                        absl::StrCat("request body must be a JSON object, got ", TypeName(body)));
  }
  if (const json* m = Field(body, "model")) {
    if (!m->is_string()) return WrongType("model", "a string", *m);
    if (m->get<std::string>() != options.model_name) {
      absl::Status st = absl::NotFoundError(
          absl::StrCat("model '", m->get<std::string>(), "' does not exist; this gateway serves '",
                       options.model_name, "' (see GET /v1/models)"));
      st.SetPayload(kParamPayload, absl::Cord("model"));
      return st;
    }
  }
  if (absl::Status st = CheckBooleans(body); !st.ok()) return st;
  ParsedRequest out;
  out.kind = kind;
  if (absl::Status st = kind == ApiKind::kCompletion ? ParsePrompt(body, options, &out.upstream)
                                                     : ParseMessages(body, options, &out.upstream);
      !st.ok()) {
    return st;
  }
  if (absl::Status st = ParseSampling(body, kind, options, &out); !st.ok()) return st;
  if (absl::Status st = CheckUnsupported(body, kind); !st.ok()) return st;
  return out;
}

ojson ChoiceBase() {
  ojson c;
  c["index"] = 0;
  return c;
}

ojson Envelope(const CompletionMeta& meta, bool chunk) {
  ojson j;
  j["id"] = meta.id;
  j["object"] = meta.kind == ApiKind::kCompletion ? "text_completion"
                : chunk                           ? "chat.completion.chunk"
                                                  : "chat.completion";
  j["created"] = meta.created;
  j["model"] = meta.model;
  return j;
}

}  // namespace

absl::Status InvalidParam(absl::string_view param, absl::string_view message) {
  absl::Status st = absl::InvalidArgumentError(message);
  if (!param.empty()) st.SetPayload(kParamPayload, absl::Cord(param));
  return st;
}

std::string ParamOf(const absl::Status& status) {
  absl::optional<absl::Cord> p = status.GetPayload(kParamPayload);
  return p.has_value() ? std::string(*p) : std::string();
}

absl::StatusOr<ParsedRequest> ParseGenerateRequest(absl::string_view body, ApiKind kind,
                                                   const ParseOptions& options) {
  // Every access above is type-checked first; this is the net for whatever a
  // future edit forgets (a request must never take the process down).
  try {
    return ParseImpl(body, kind, options);
  } catch (const std::exception& e) {
    return InvalidParam("", absl::StrCat("invalid request: ", e.what()));
  }
}

ojson UsageJson(int64_t prompt_tokens, int64_t completion_tokens) {
  ojson u;
  u["prompt_tokens"] = prompt_tokens;
  u["completion_tokens"] = completion_tokens;
  u["total_tokens"] = prompt_tokens + completion_tokens;
  return u;
}

ojson ResponseJson(const CompletionMeta& meta, const std::vector<int32_t>& tokens,
                   absl::string_view finish_reason, int64_t prompt_tokens, absl::string_view text) {
  ojson j = Envelope(meta, /*chunk=*/false);
  ojson c = ChoiceBase();
  if (meta.kind == ApiKind::kCompletion) {
    c["text"] = std::string(text);
    c["token_ids"] = tokens;
  } else {
    ojson m;
    m["role"] = "assistant";
    m["content"] = std::string(text);
    m["token_ids"] = tokens;
    c["message"] = std::move(m);
  }
  c["logprobs"] = nullptr;
  c["finish_reason"] = std::string(finish_reason);
  j["choices"] = ojson::array({std::move(c)});
  j["usage"] = UsageJson(prompt_tokens, static_cast<int64_t>(tokens.size()));
  return j;
}

ojson TokenChunkJson(const CompletionMeta& meta, int32_t token, bool first,
                     absl::string_view text) {
  ojson j = Envelope(meta, /*chunk=*/true);
  ojson c = ChoiceBase();
  if (meta.kind == ApiKind::kCompletion) {
    c["text"] = std::string(text);
    c["token_ids"] = ojson::array({token});
  } else {
    ojson d;
    if (first) d["role"] = "assistant";
    d["content"] = std::string(text);
    d["token_ids"] = ojson::array({token});
    c["delta"] = std::move(d);
  }
  c["logprobs"] = nullptr;
  c["finish_reason"] = nullptr;
  j["choices"] = ojson::array({std::move(c)});
  return j;
}

ojson FinalChunkJson(const CompletionMeta& meta, absl::string_view finish_reason,
                     int64_t prompt_tokens, int64_t completion_tokens, absl::string_view text) {
  ojson j = Envelope(meta, /*chunk=*/true);
  ojson c = ChoiceBase();
  if (meta.kind == ApiKind::kCompletion) {
    c["text"] = std::string(text);
    c["token_ids"] = ojson::array();
  } else {
    c["delta"] = ojson::object();
    if (!text.empty()) c["delta"]["content"] = std::string(text);
  }
  c["logprobs"] = nullptr;
  c["finish_reason"] = std::string(finish_reason);
  j["choices"] = ojson::array({std::move(c)});
  j["usage"] = UsageJson(prompt_tokens, completion_tokens);
  return j;
}

ojson ErrorJson(absl::string_view message, absl::string_view type, absl::string_view param,
                absl::string_view code) {
  ojson e;
  e["message"] = std::string(message);
  e["type"] = std::string(type);
  e["param"] = param.empty() ? ojson(nullptr) : ojson(std::string(param));
  e["code"] = code.empty() ? ojson(nullptr) : ojson(std::string(code));
  ojson j;
  j["error"] = std::move(e);
  return j;
}

std::string Dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

}  // namespace dmoe::gateway
