// OpenAI request bodies to gateway::ParseGenerateRequest, as the gateway
// parses them with a model's tokenizer and chat template (tiny-v2lite's
// tokenizer, DeepSeek-V3's template). Byte 0 picks /v1/completions or
// /v1/chat/completions; the rest is the body.
#include <cstddef>
#include <cstdint>

#include "absl/strings/string_view.h"
#include "fuzz/fuzz_data.h"
#include "gateway/openai_protocol.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace {
const dmoe::gateway::ParseOptions& Options() {
  static const auto* opts = [] {
    auto* o = new dmoe::gateway::ParseOptions();
    o->tokenizer = dmoe::fuzz::ValueOrDie(dmoe::text::Tokenizer::FromJson(
                                              dmoe::fuzz::ReadDataFile("tokenizer.json"),
                                              dmoe::fuzz::ReadDataFile("tokenizer_config.json")),
                                          "tokenizer")
                       .value()
                       .release();
    o->chat_template =
        dmoe::fuzz::ValueOrDie(
            dmoe::text::ChatTemplate::Parse(dmoe::fuzz::ReadDataFile("deepseek_v3.jinja")),
            "template")
            .value()
            .release();
    o->max_tokens_limit = 4096;
    return o;
  }();
  return *opts;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto kind =
      (data[0] & 1) ? dmoe::gateway::ApiKind::kChatCompletion : dmoe::gateway::ApiKind::kCompletion;
  auto parsed = dmoe::gateway::ParseGenerateRequest(
      absl::string_view(reinterpret_cast<const char*>(data + 1), size - 1), kind, Options());
  if (!parsed.ok()) (void)dmoe::gateway::ParamOf(parsed.status());
  return 0;
}
