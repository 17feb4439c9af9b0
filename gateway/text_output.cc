#include "gateway/text_output.h"

#include <algorithm>
#include <utility>

namespace dmoe::gateway {

TextOutput::TextOutput(const text::Tokenizer& tokenizer, std::vector<std::string> stop_strings,
                       bool skip_special_tokens)
    : detok_(tokenizer, skip_special_tokens) {
  for (std::string& s : stop_strings)
    if (!s.empty()) stops_.push_back(std::move(s));
}

std::string TextOutput::Push(int32_t token) {
  if (stopped_) return "";
  auto piece = detok_.Push(token);
  if (piece.ok()) pending_ += *piece;  // an unknown id adds nothing
  return Release(/*at_end=*/false);
}

std::string TextOutput::Finish() {
  if (stopped_) return "";
  pending_ += detok_.Finish();
  return Release(/*at_end=*/true);
}

std::string TextOutput::Release(bool at_end) {
  // Text already returned never holds the start of a match (it was held back),
  // so a match starts inside pending_: take the earliest one.
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) cut = std::min(cut, pending_.find(s));
  std::string out;
  if (cut != std::string::npos) {
    out = pending_.substr(0, cut);
    pending_.clear();
    stopped_ = true;
  } else {
    // Hold back the longest suffix that is a proper prefix of a stop string.
    size_t hold = 0;
    if (!at_end) {
      for (const std::string& s : stops_) {
        for (size_t n = std::min(s.size() - 1, pending_.size()); n > hold; --n) {
          if (pending_.compare(pending_.size() - n, n, s, 0, n) == 0) {
            hold = n;
            break;
          }
        }
      }
    }
    out = pending_.substr(0, pending_.size() - hold);
    pending_.erase(0, pending_.size() - hold);
  }
  text_ += out;
  return out;
}

}  // namespace dmoe::gateway
