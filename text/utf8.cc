#include "text/utf8.h"

#include <cstdint>

#include "absl/strings/str_format.h"

namespace dmoe::text {
namespace {

enum class Seq { kValid, kInvalid, kIncomplete };

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Classifies the sequence starting at p[0] (n > 0 bytes available). kValid:
// *len is its length. kInvalid: *len bytes (the maximal subpart, at least 1)
// are replaced. kIncomplete: all n bytes are a valid prefix of a longer
// sequence.
Seq Classify(const uint8_t* p, size_t n, size_t* len) {
  const uint8_t b0 = p[0];
  if (b0 < 0x80) {
    *len = 1;
    return Seq::kValid;
  }
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *len = 1;
    return Seq::kInvalid;
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= n) {
      *len = n;
      return Seq::kIncomplete;
    }
    const uint8_t b = p[i];
    const bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *len = i;
      return Seq::kInvalid;
    }
  }
  *len = need;
  return Seq::kValid;
}

// Decodes as much of `in` as is final; appends to *out. Returns the number of
// bytes consumed; when `final` is false an incomplete trailing sequence is left
// unconsumed.
size_t DecodeInto(std::string_view in, bool final, std::string* out) {
  const auto* p = reinterpret_cast<const uint8_t*>(in.data());
  const size_t n = in.size();
  size_t i = 0;
  size_t run = 0;  // start of the current run of valid bytes
  while (i < n) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    switch (Classify(p + i, n - i, &len)) {
      case Seq::kValid:
        i += len;
        break;
      case Seq::kInvalid:
        out->append(in.substr(run, i - run));
        out->append(kReplacement);
        i += len;
        run = i;
        break;
      case Seq::kIncomplete:
        out->append(in.substr(run, i - run));
        if (!final) return i;
        out->append(kReplacement);
        return n;
    }
  }
  out->append(in.substr(run, n - run));
  return n;
}

}  // namespace

absl::Status ValidateUtf8(std::string_view s, std::string_view what) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    if (Classify(p + i, s.size() - i, &len) != Seq::kValid) {
      return absl::InvalidArgumentError(absl::StrFormat("%s%sinvalid UTF-8 at byte %d (0x%02x)",
                                                        what, what.empty() ? "" : ": ", i, p[i]));
    }
    i += len;
  }
  return absl::OkStatus();
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  DecodeInto(bytes, /*final=*/true, &out);
  return out;
}

std::string Utf8StreamDecoder::Push(std::string_view bytes) {
  std::string out;
  if (pending_.empty()) {
    const size_t used = DecodeInto(bytes, /*final=*/false, &out);
    pending_.assign(bytes.substr(used));
    return out;
  }
  pending_.append(bytes);
  const size_t used = DecodeInto(pending_, /*final=*/false, &out);
  pending_.erase(0, used);
  return out;
}

std::string Utf8StreamDecoder::Finish() {
  std::string out;
  DecodeInto(pending_, /*final=*/true, &out);
  pending_.clear();
  return out;
}

}  // namespace dmoe::text
