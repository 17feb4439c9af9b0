// Encoding and decoding with the tiny-v2lite tokenizer (byte-level BPE, the
// generated model's): the input as text to Encode (with and without special
// tokens; valid UTF-8 must encode and decode back to itself), and as
// little-endian int32 ids to Decode and the streaming detokenizer.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_data.h"
#include "text/tokenizer.h"

namespace {
const dmoe::text::Tokenizer& Tok() {
  static const auto* tok =
      dmoe::fuzz::ValueOrDie(
          dmoe::text::Tokenizer::FromJson(dmoe::fuzz::ReadDataFile("tokenizer.json"),
                                          dmoe::fuzz::ReadDataFile("tokenizer_config.json")),
          "tokenizer")
          .value()
          .release();
  return *tok;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& tok = Tok();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto plain = tok.Encode(text, false);
  if (plain.ok()) {
    auto back = tok.Decode(*plain, false);
    // Byte-level BPE without normalization is lossless on valid UTF-8.
    if (!back.ok() || *back != text) std::abort();
  }
  (void)tok.Encode(text, true);

  std::vector<int32_t> ids(size / 4);
  if (!ids.empty()) std::memcpy(ids.data(), data, ids.size() * 4);
  for (bool skip : {false, true}) {
    auto whole = tok.Decode(ids, skip);
    // The streamed pieces concatenate to Decode's text (tokenizer.h).
    dmoe::text::StreamingDetokenizer stream(tok, skip);
    std::string streamed;
    bool ok = true;
    for (int32_t id : ids) {
      auto piece = stream.Push(id);
      if (!piece.ok()) {
        ok = false;
        break;
      }
      streamed += *piece;
    }
    streamed += stream.Finish();
    if (ok != whole.ok() || (ok && streamed != *whole)) std::abort();
  }
  return 0;
}
