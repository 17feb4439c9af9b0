// The checkpoint's own tokenizer: Hugging Face `tokenizer.json` (byte-level
// BPE) plus `tokenizer_config.json` (BOS/EOS, add_bos_token, chat_template).
//
// Encoding follows Hugging Face `tokenizers` step by step, so ids are
// identical:
//  1. Added tokens are split out of the text first (leftmost, longest match;
//  the
//     non-normalized ones before the normalized ones, as HF does), whether
//     special or not and whatever `add_special_tokens` says (HF's default).
//     Their lstrip / rstrip absorb neighbouring whitespace; single_word needs
//     word boundaries.
//  2. The normalizer must be absent or an empty Sequence (DeepSeek's); others
//  are
//     an error at load, not a silently different tokenization.
//  3. Pre-tokenizers: Sequence, Split (Regex or String pattern; behaviours
//  Removed,
//     Isolated, MergedWithPrevious, MergedWithNext, Contiguous; invert),
//     ByteLevel (add_prefix_space, use_regex with the GPT-2 pattern), Digits.
//     Regexes are Oniguruma syntax in HF; they run on PCRE2 (UTF + UCP, JIT)
//     with `\s`/`\S` rewritten to Oniguruma's Unicode White_Space set (PCRE2's
//     lacks U+0085).
//  4. Model: BPE over bytes (the vocabulary's byte-level strings mapped back to
//     bytes), merges applied lowest rank first, leftmost on ties, as HF's heap
//     does, in O(n log n) per word; words over 256 bytes merge rank by rank
//     from sorted buckets when the merge list's ranks increase (checked at
//     load), with the same result. `ignore_merges` honoured. Results for words
//     up to 256 bytes are cached (sharded, bounded).
//  5. With add_special_tokens: when tokenizer_config.json has add_bos_token /
//     add_eos_token (transformers' LlamaTokenizerFast, DeepSeek's class), BOS /
//     EOS are added as it says; otherwise a TemplateProcessing post-processor's
//     "single" template is applied; otherwise nothing is added.
// Text must be valid UTF-8 (INVALID_ARGUMENT naming the byte offset otherwise).
//
// Decoding is the ByteLevel decoder: every token's bytes concatenated (added
// tokens as their content), then ill-formed UTF-8 replaced by U+FFFD as HF does
// (`Utf8Lossy`). StreamingDetokenizer does the same one id at a time and never
// returns half a character.
//
// Thread safety: a loaded Tokenizer is immutable apart from its internally
// synchronized cache; every const method may be called concurrently.
#ifndef DMOE_TEXT_TOKENIZER_H_
#define DMOE_TEXT_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "text/utf8.h"

namespace dmoe::text {

struct AddedTokenInfo {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

class Tokenizer {
 public:
  // `dir`/tokenizer.json, and `dir`/tokenizer_config.json when it exists.
  // NOT_FOUND when tokenizer.json is missing; INVALID_ARGUMENT (naming the file
  // and key) for malformed or unsupported content.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& dir);
  // From the two files' contents (`tokenizer_config_json` may be empty).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      std::string_view tokenizer_json, std::string_view tokenizer_config_json);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // The ids of `text` (see the header comment). INVALID_ARGUMENT for invalid
  // UTF-8.
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens = false) const;

  // The text of `ids`, ill-formed UTF-8 replaced by U+FFFD. INVALID_ARGUMENT
  // for an id that is not a token. skip_special_tokens drops special added
  // tokens.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                     bool skip_special_tokens = false) const;
  // Appends the raw bytes of token `id` (possibly part of a character) to *out;
  // nothing for a special token when skip_special_tokens. INVALID_ARGUMENT for
  // an id that is not a token.
  absl::Status AppendTokenBytes(int32_t id, bool skip_special_tokens, std::string* out) const;

  // Largest token id + 1 (model vocabulary and added tokens).
  int32_t vocab_size() const;
  // The id of a token as written in tokenizer.json (byte-level string for model
  // tokens, content for added tokens).
  std::optional<int32_t> TokenToId(std::string_view token) const;
  bool IsSpecial(int32_t id) const;
  const std::vector<AddedTokenInfo>& added_tokens() const;

  // From tokenizer_config.json ("" / nullopt when absent).
  const std::string& bos_token() const;
  const std::string& eos_token() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // The "default" chat template (a string, or the entry named "default" of a
  // list).
  const std::string& chat_template() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns ids into text incrementally: Push returns the text that became complete
// (a character split across byte-level tokens is returned once its last byte
// arrives), Finish the rest (an unfinished character as U+FFFD). The
// concatenation equals Tokenizer::Decode of all the ids. One thread at a time;
// the tokenizer must outlive it.
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens = false)
      : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

  absl::StatusOr<std::string> Push(int32_t id);
  std::string Finish() { return utf8_.Finish(); }
  // Bytes of an unfinished character held back.
  size_t pending() const { return utf8_.pending(); }

 private:
  const Tokenizer& tokenizer_;
  const bool skip_special_tokens_;
  Utf8StreamDecoder utf8_;
  std::string scratch_;
};

}  // namespace dmoe::text

#endif  // DMOE_TEXT_TOKENIZER_H_
