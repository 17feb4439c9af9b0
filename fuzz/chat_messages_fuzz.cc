// Rendering DeepSeek-V3's chat template (fuzz/data/deepseek_v3.jinja) with a
// fuzzed context: the input is JSON; an object is the whole context, anything
// else is the "messages" value (add_generation_prompt true).
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_data.h"
#include "nlohmann/json.hpp"
#include "text/chat_template.h"

namespace {
const dmoe::text::ChatTemplate& Template() {
  static const auto* t =
      dmoe::fuzz::ValueOrDie(
          dmoe::text::ChatTemplate::Parse(dmoe::fuzz::ReadDataFile("deepseek_v3.jinja")),
          "template")
          .value()
          .release();
  return *t;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& tmpl = Template();
  using json = nlohmann::ordered_json;
  json j = json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  if (!j.is_object()) {
    j = json{{"messages", std::move(j)},
             {"add_generation_prompt", true},
             {"bos_token", "<｜begin▁of▁sentence｜>"},
             {"eos_token", "<｜end▁of▁sentence｜>"}};
  }
  (void)tmpl.Render(j);
  return 0;
}
