// Internal to dmoe_text (namespace dmoe::text::jinja): the chat template's
// lexer, not an API. Include only from text/chat_template.cc and text/jinja/.
//
// Contract: Lexer takes a template source whose newlines are already
// normalized to \n (ChatTemplate::Parse does that) and which must outlive it.
// Run gives the tokens: text between tags (with Jinja's whitespace control
// applied: '-' and '+' modifiers, trim_blocks, lstrip_blocks; comments
// dropped), kVarBegin/kVarEnd around {{ }}, kBlockBegin/kBlockEnd around
// {% %}, and in them names, operators and literals (strings decoded with
// Python's escapes, ints as int64, floats as double), ending with kEof. Every
// token carries its byte offset in the source.
// Errors are INVALID_ARGUMENT "chat template line L col C: <what>" (Where
// formats the position; the parser and renderer use it for theirs too):
// unterminated strings and comments, a missing '}}' or '%}', an unexpected
// character, an integer literal beyond int64, a float literal beyond double.
#ifndef DMOE_TEXT_JINJA_LEXER_H_
#define DMOE_TEXT_JINJA_LEXER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmoe::text::jinja {

struct Token {
  enum class Kind {
    kText,
    kVarBegin,
    kVarEnd,
    kBlockBegin,
    kBlockEnd,
    kName,
    kString,
    kInt,
    kFloat,
    kOp,
    kEof
  };
  Kind kind;
  std::string text;  // text, name, operator, decoded string literal
  int64_t i = 0;
  double f = 0;
  size_t pos = 0;
};

class Lexer {
 public:
  explicit Lexer(const std::string& src) : src_(src) {}

  absl::Status Run(std::vector<Token>* out);
  std::string Where(size_t pos) const {
    int line = 1, col = 1;
    for (size_t k = 0; k < pos && k < src_.size(); ++k) {
      if (src_[k] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    return absl::StrFormat("chat template line %d col %d", line, col);
  }

 private:
  absl::Status Error(size_t pos, std::string_view msg) const {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(pos), ": ", absl::string_view(msg.data(), msg.size())));
  }
  absl::Status LexTag(size_t* pos, bool block, std::vector<Token>* out, bool* strip_after);
  absl::StatusOr<std::string> LexString(size_t* pos) const;

  const std::string& src_;
};

}  // namespace dmoe::text::jinja

#endif  // DMOE_TEXT_JINJA_LEXER_H_
