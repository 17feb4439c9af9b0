// The text of a generation as its tokens arrive: streaming-safe UTF-8 (a
// character split across byte-level tokens comes out whole, once) and `stop`
// strings matched on the text (the text ends before the first match, as in
// OpenAI's API; the match itself is not returned).
//
// While stop strings are set, text that could be the start of one (a suffix of
// the text that is a prefix of a stop string) is held back until the next token
// decides, so a client never sees text that is later cut. Token ids the
// tokenizer does not know (a model vocabulary padded beyond the tokenizer's)
// decode to nothing, as Hugging Face's decode skips them.
//
// Thread safety: one thread at a time; the tokenizer must outlive the object.
#ifndef DMOE_GATEWAY_TEXT_OUTPUT_H_
#define DMOE_GATEWAY_TEXT_OUTPUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace dmoe::gateway {

class TextOutput {
 public:
  TextOutput(const text::Tokenizer& tokenizer, std::vector<std::string> stop_strings,
             bool skip_special_tokens);

  // Adds one generated token; returns the text that is final now (possibly
  // empty). After a stop string matched, stopped() is true and further tokens
  // are ignored.
  std::string Push(int32_t token);
  // The end of the generation: the held-back text (an unfinished character as
  // U+FFFD); a stop string may still match in it.
  std::string Finish();

  bool stopped() const { return stopped_; }
  // Everything returned so far.
  const std::string& text() const { return text_; }

 private:
  // Moves what is final from pending_ to the result.
  std::string Release(bool at_end);

  std::vector<std::string> stops_;  // non-empty ones
  text::StreamingDetokenizer detok_;
  std::string pending_;  // complete characters not returned yet
  std::string text_;
  bool stopped_ = false;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_TEXT_OUTPUT_H_
