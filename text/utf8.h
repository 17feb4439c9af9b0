// UTF-8 validation, lossy conversion and incremental (streaming) decoding.
//
// "Well-formed" is Unicode's Table 3-7 (no overlong forms, no surrogates,
// nothing above U+10FFFF). Lossy conversion replaces each maximal ill-formed
// subpart by one U+FFFD, the rule of the WHATWG Encoding standard, Rust's
// String::from_utf8_lossy (what Hugging Face tokenizers use to decode) and
// JavaScript's TextDecoder, so the three agree on the replacement characters
// too.
//
// Thread safety: the functions are pure; a Utf8StreamDecoder is used by one
// thread at a time.
#ifndef DMOE_TEXT_UTF8_H_
#define DMOE_TEXT_UTF8_H_

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace dmoe::text {

// OK, or INVALID_ARGUMENT "invalid UTF-8 at byte 17 (0xff)" naming the first
// ill-formed byte (`what` prefixes the message when not empty).
absl::Status ValidateUtf8(std::string_view s, std::string_view what = "");

// `bytes` with every maximal ill-formed subpart (and a truncated last sequence)
// replaced by U+FFFD.
std::string Utf8Lossy(std::string_view bytes);

// Streaming decoding: bytes arrive in pieces (e.g. one token at a time, where a
// byte-level token may carry half of a character); Push returns only complete
// characters, so a client never sees half a character. Ill-formed bytes become
// U+FFFD as soon as they are known to be ill-formed. The concatenation of every
// Push and the Finish equals Utf8Lossy of the concatenated input.
class Utf8StreamDecoder {
 public:
  // Appends `bytes`; returns the text that became complete.
  std::string Push(std::string_view bytes);
  // Ends the stream: a held-back incomplete sequence becomes U+FFFD.
  std::string Finish();
  // Bytes held back (the start of an incomplete character, at most 3).
  size_t pending() const { return pending_.size(); }

 private:
  std::string pending_;
};

}  // namespace dmoe::text

#endif  // DMOE_TEXT_UTF8_H_
