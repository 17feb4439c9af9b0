// Loading: tokenizer.json's text, optionally followed by a NUL byte and
// tokenizer_config.json's text, to Tokenizer::FromJson; an accepted tokenizer
// then encodes and decodes a fixed text, its special tokens and every id.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::string_view config;
  if (size_t nul = in.find('\0'); nul != in.npos) {
    config = in.substr(nul + 1);
    in = in.substr(0, nul);
  }
  auto tok = dmoe::text::Tokenizer::FromJson(in, config);
  if (!tok.ok()) return 0;
  const auto& t = **tok;
  for (bool special : {false, true}) {
    auto ids = t.Encode("Hello, world! 123 <｜begin▁of▁sentence｜> héllo\n\t  x", special);
    if (ids.ok()) (void)t.Decode(*ids, special);
  }
  std::vector<int32_t> all;
  for (int32_t id = -1; id <= t.vocab_size() && id < 4096; ++id) all.push_back(id);
  (void)t.Decode(all, false);
  (void)t.Decode(all, true);
  return 0;
}
