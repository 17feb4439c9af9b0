#include "text/jinja/lexer.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>

#include "core/status.h"
#include "text/jinja/values.h"

namespace dmoe::text::jinja {

absl::StatusOr<std::string> Lexer::LexString(size_t* pos) const {
  const size_t start = *pos;
  const char q = src_[(*pos)++];
  std::string out;
  while (*pos < src_.size() && src_[*pos] != q) {
    char c = src_[(*pos)++];
    if (c != '\\') {
      out.push_back(c);
      continue;
    }
    if (*pos >= src_.size()) break;
    const char e = src_[(*pos)++];
    auto hex = [&](int n) -> std::optional<uint32_t> {
      if (*pos + n > src_.size()) return std::nullopt;
      uint32_t v = 0;
      for (int k = 0; k < n; ++k) {
        const char h = src_[*pos + k];
        v <<= 4;
        if (h >= '0' && h <= '9')
          v |= h - '0';
        else if (h >= 'a' && h <= 'f')
          v |= h - 'a' + 10;
        else if (h >= 'A' && h <= 'F')
          v |= h - 'A' + 10;
        else
          return std::nullopt;
      }
      *pos += n;
      return v;
    };
    auto append_cp = [&](uint32_t cp) {
      if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
      } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      } else {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
    };
    switch (e) {
      case 'n':
        out.push_back('\n');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'r':
        out.push_back('\r');
        break;
      case '\\':
        out.push_back('\\');
        break;
      case '\'':
        out.push_back('\'');
        break;
      case '"':
        out.push_back('"');
        break;
      case 'a':
        out.push_back('\a');
        break;
      case 'b':
        out.push_back('\b');
        break;
      case 'f':
        out.push_back('\f');
        break;
      case 'v':
        out.push_back('\v');
        break;
      case '\n':
        break;  // line continuation
      case 'x':
      case 'u':
      case 'U': {
        auto v = hex(e == 'x' ? 2 : e == 'u' ? 4 : 8);
        if (!v || *v > 0x10FFFF) return Error(*pos - 2, "invalid escape in string literal");
        append_cp(*v);
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          uint32_t v = e - '0';
          for (int k = 0; k < 2 && *pos < src_.size() && src_[*pos] >= '0' && src_[*pos] <= '7';
               ++k)
            v = v * 8 + (src_[(*pos)++] - '0');
          append_cp(v);
        } else {
          out.push_back('\\');  // Python keeps unknown escapes
          out.push_back(e);
        }
    }
  }
  if (*pos >= src_.size()) return Error(start, "unterminated string literal");
  ++*pos;
  return out;
}

absl::Status Lexer::LexTag(size_t* pos, bool block, std::vector<Token>* out, bool* strip_after) {
  const char* end_tag = block ? "%}" : "}}";
  int depth = 0;
  while (true) {
    while (*pos < src_.size() && IsPySpace(src_[*pos])) ++*pos;
    if (*pos >= src_.size()) return Error(*pos, absl::StrCat("missing '", end_tag, "'"));
    const size_t p = *pos;
    if (depth == 0 && src_.compare(p, 3, std::string("-") + end_tag) == 0) {
      *strip_after = true;
      *pos += 3;
      out->push_back({block ? Token::Kind::kBlockEnd : Token::Kind::kVarEnd, "", 0, 0, p});
      return absl::OkStatus();
    }
    if (depth == 0 && src_.compare(p, 2, end_tag) == 0) {
      *strip_after = false;
      *pos += 2;
      out->push_back({block ? Token::Kind::kBlockEnd : Token::Kind::kVarEnd, "", 0, 0, p});
      return absl::OkStatus();
    }
    const char c = src_[p];
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t e = p;
      while (e < src_.size() &&
             (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
        ++e;
      out->push_back({Token::Kind::kName, src_.substr(p, e - p), 0, 0, p});
      *pos = e;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t e = p;
      bool is_float = false;
      while (e < src_.size() &&
             (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
        ++e;
      if (e + 1 < src_.size() && src_[e] == '.' &&
          std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
        is_float = true;
        ++e;
        while (e < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
      }
      if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
        size_t x = e + 1;
        if (x < src_.size() && (src_[x] == '+' || src_[x] == '-')) ++x;
        if (x < src_.size() && std::isdigit(static_cast<unsigned char>(src_[x]))) {
          is_float = true;
          e = x;
          while (e < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
        }
      }
      std::string num;
      for (size_t k = p; k < e; ++k)
        if (src_[k] != '_') num.push_back(src_[k]);
      Token t{is_float ? Token::Kind::kFloat : Token::Kind::kInt, num, 0, 0, p};
      if (is_float) {
        // Python reads 1e999 as inf: almost surely not what was meant, so an
        // error here; 1e-999 is 0.0 as in Python.
        const std::optional<double> f = ParseDouble(num);
        if (!f || std::isinf(*f))
          return Error(
              p, absl::StrCat("float literal ", Quoted(num), " is beyond the range of a double"));
        t.f = *f;
      } else if (std::from_chars(num.data(), num.data() + num.size(), t.i).ec != std::errc()) {
        // Python's ints are unbounded, ours are int64.
        return Error(p, absl::StrCat("integer literal ", Quoted(num), " is too large (at most ",
                                     INT64_MAX, ")"));
      }
      out->push_back(std::move(t));
      *pos = e;
    } else if (c == '\'' || c == '"') {
      DMOE_ASSIGN_OR_RETURN(std::string s, LexString(pos));
      out->push_back({Token::Kind::kString, std::move(s), 0, 0, p});
    } else {
      static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                   "/",  "%",  "~",  "<",  ">",  "(",  ")", "[", "]",
                                   "{",  "}",  ",",  ".",  ":",  "|",  "="};
      const char* op = nullptr;
      for (const char* o : kOps) {
        if (src_.compare(p, std::strlen(o), o) == 0) {
          op = o;
          break;
        }
      }
      if (op == nullptr)
        return Error(p, absl::StrCat("unexpected character '", std::string(1, c), "'"));
      if (*op == '(' || *op == '[' || *op == '{') ++depth;
      if ((*op == ')' || *op == ']' || *op == '}') && depth > 0) --depth;
      out->push_back({Token::Kind::kOp, op, 0, 0, p});
      *pos += std::strlen(op);
    }
  }
}

absl::Status Lexer::Run(std::vector<Token>* out) {
  size_t pos = 0;
  bool strip_next = false;  // the previous tag ended with '-'
  while (pos <= src_.size()) {
    // The next tag start.
    size_t tag = pos;
    while (true) {
      tag = src_.find('{', tag);
      if (tag == std::string::npos || tag + 1 >= src_.size()) {
        tag = std::string::npos;
        break;
      }
      const char n = src_[tag + 1];
      if (n == '{' || n == '%' || n == '#') break;
      ++tag;
    }
    std::string text = src_.substr(pos, tag == std::string::npos ? std::string::npos : tag - pos);
    if (strip_next) text = Strip(text, true, false, std::nullopt);
    if (tag == std::string::npos) {
      if (!text.empty()) out->push_back({Token::Kind::kText, text, 0, 0, pos});
      break;
    }
    const char kind = src_[tag + 1];
    const char modifier = tag + 2 < src_.size() ? src_[tag + 2] : '\0';
    if (modifier == '-') {
      text = Strip(text, false, true, std::nullopt);
    } else if (kind != '{' && modifier != '+') {
      // lstrip_blocks: spaces and tabs between the line start and a block tag.
      const size_t nl = text.rfind('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      const bool line_start = nl != std::string::npos || pos == 0 || src_[pos - 1] == '\n';
      if (line_start && text.find_first_not_of(" \t", from) == std::string::npos) text.erase(from);
    }
    if (!text.empty()) out->push_back({Token::Kind::kText, text, 0, 0, pos});
    pos = tag + 2 + ((modifier == '-' || modifier == '+') ? 1 : 0);
    bool strip_after = false;
    if (kind == '#') {
      const size_t end = src_.find("#}", pos);
      if (end == std::string::npos) return Error(tag, "unterminated comment");
      strip_after = end > pos && src_[end - 1] == '-';
      pos = end + 2;
    } else {
      out->push_back(
          {kind == '{' ? Token::Kind::kVarBegin : Token::Kind::kBlockBegin, "", 0, 0, tag});
      DMOE_RETURN_IF_ERROR(LexTag(&pos, kind == '%', out, &strip_after));
    }
    // trim_blocks: the first newline after a block or comment tag.
    if (!strip_after && kind != '{' && pos < src_.size() && src_[pos] == '\n') ++pos;
    strip_next = strip_after;
  }
  out->push_back({Token::Kind::kEof, "", 0, 0, src_.size()});
  return absl::OkStatus();
}

}  // namespace dmoe::text::jinja
