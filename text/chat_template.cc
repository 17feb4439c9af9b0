#include "text/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <compare>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status.h"
#include "text/tokenizer.h"

namespace dmoe::text {
namespace {

using ojson = nlohmann::ordered_json;

// ---------------------------------------------------------------------------
// Values: what Jinja (Python) values a chat template sees.

struct Value;
using List = std::vector<Value>;
struct Dict {
  std::vector<std::pair<std::string, Value>>
      items;  // insertion order, as Python
  Value* Find(std::string_view key);
};

struct Value {
  enum class Kind {
    kUndefined,
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kList,
    kDict,
    kNamespace
  };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;               // kString; for kUndefined the name, for messages
  std::shared_ptr<List> list;  // kList (tuples too)
  std::shared_ptr<Dict>
      dict;  // kDict, kNamespace (namespaces are mutable in place)

  static Value Undefined(std::string name) {
    Value v;
    v.s = std::move(name);
    return v;
  }
  static Value None() { return Make(Kind::kNone); }
  static Value Bool(bool x) {
    Value v = Make(Kind::kBool);
    v.b = x;
    return v;
  }
  static Value Int(int64_t x) {
    Value v = Make(Kind::kInt);
    v.i = x;
    return v;
  }
  static Value Float(double x) {
    Value v = Make(Kind::kFloat);
    v.f = x;
    return v;
  }
  static Value Str(std::string x) {
    Value v = Make(Kind::kString);
    v.s = std::move(x);
    return v;
  }
  static Value NewList(List l = {}) {
    Value v = Make(Kind::kList);
    v.list = std::make_shared<List>(std::move(l));
    return v;
  }
  static Value NewDict(Kind kind = Kind::kDict) {
    Value v = Make(kind);
    v.dict = std::make_shared<Dict>();
    return v;
  }
  static Value Make(Kind k) {
    Value v;
    v.kind = k;
    return v;
  }
  bool is(Kind k) const { return kind == k; }
  bool IsNumber() const {
    return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool;
  }
  double AsDouble() const {
    return kind == Kind::kFloat ? f : kind == Kind::kBool ? b : i;
  }
  // kInt or kBool (Python's bools are the ints 0 and 1).
  int64_t AsInt() const { return kind == Kind::kBool ? b : i; }
};

Value* Dict::Find(std::string_view key) {
  for (auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

const char* KindName(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "undefined";
    case Value::Kind::kNone:
      return "none";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "string";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kDict:
      return "dict";
    case Value::Kind::kNamespace:
      return "namespace";
  }
  return "?";
}

Value FromJson(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null:
      return Value::None();
    case ojson::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case ojson::value_t::number_integer:
      return Value::Int(j.get<int64_t>());
    case ojson::value_t::number_unsigned:
      // Above int64's range Python would keep the exact int; the nearest
      // double is closer to it than a wrapped negative number.
      if (j.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        return Value::Float(static_cast<double>(j.get<uint64_t>()));
      return Value::Int(j.get<int64_t>());
    case ojson::value_t::number_float:
      return Value::Float(j.get<double>());
    case ojson::value_t::string:
      return Value::Str(j.get<std::string>());
    case ojson::value_t::array: {
      Value v = Value::NewList();
      for (const ojson& e : j) v.list->push_back(FromJson(e));
      return v;
    }
    case ojson::value_t::object: {
      Value v = Value::NewDict();
      for (auto it = j.begin(); it != j.end(); ++it)
        v.dict->items.emplace_back(it.key(), FromJson(it.value()));
      return v;
    }
    default:
      return Value::None();
  }
}

// Python's repr(float): shortest round-trip digits, exponent form below 1e-4
// and from 1e16.
std::string PyFloat(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto r =
      std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // "-1.2345e+05"
  const size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  // to_chars wrote the exponent as [+-]digits; from_chars takes no '+'.
  int exp = 0;
  std::from_chars(sci.data() + e + 1 + (sci[e + 1] == '+'),
                  sci.data() + sci.size(), exp);
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits.push_back(c);
  std::string out;
  if (exp < -4 || exp >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += absl::StrFormat("e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
  } else if (exp < 0) {
    out = "0." + std::string(-exp - 1, '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exp + 1) {
    out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
  }
  return neg ? "-" + out : out;
}

// A literal or input quoted for an error message, cut when long (a fuzzer's
// 100,000-digit number should not make a 100 KB message).
std::string Quoted(std::string_view s) {
  constexpr size_t kMax = 40;
  const absl::string_view cut(s.data(), std::min(s.size(), kMax));
  if (s.size() <= kMax) return absl::StrCat("'", cut, "'");
  return absl::StrCat("'", cut, "...' (", s.size(), " characters)");
}

// For a decimal number that from_chars found out of double's range: whether
// it is above the range (else below it, towards zero). Out-of-range values are
// beyond 1e308 or below 1e-324, so the sign of the decimal exponent of the
// first significant digit decides.
bool AboveDoubleRange(std::string_view s) {
  const size_t e = std::min(s.find_first_of("eE"), s.size());
  const std::string_view mant = s.substr(0, e);
  int64_t exp = 0;
  if (e < s.size()) {
    std::string_view x = s.substr(e + 1);
    const bool neg = !x.empty() && x[0] == '-';
    if (!x.empty() && (x[0] == '+' || x[0] == '-')) x.remove_prefix(1);
    // Digits only (from_chars matched them): failure means beyond int64.
    if (std::from_chars(x.data(), x.data() + x.size(), exp).ec != std::errc())
      exp = INT64_MAX / 2;
    if (neg) exp = -exp;
  }
  const size_t dot = std::min(mant.find('.'), mant.size());
  const size_t first = mant.find_first_not_of("0.");
  if (first == std::string_view::npos) return false;  // zero
  const int64_t lead = first < dot ? static_cast<int64_t>(dot - first) - 1
                                   : -static_cast<int64_t>(first - dot);
  return lead + exp > 0;
}

// All of `s` as Python's float() reads it (an optional sign, decimal digits
// with an optional fraction and exponent, or inf/infinity/nan), without
// exceptions and without the C locale's say on the decimal point: nullopt
// when `s` is not such a number. Beyond double's range is +-inf and below it
// 0, as in Python (float("1e999") is inf, float("1e-999") is 0.0).
std::optional<double> ParseDouble(std::string_view s) {
  const bool neg = !s.empty() && s[0] == '-';
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) s.remove_prefix(1);
  if (s.empty() || s[0] == '+' || s[0] == '-') return std::nullopt;
  double d = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), d);
  if (ptr != s.data() + s.size()) return std::nullopt;
  if (ec == std::errc::result_out_of_range)
    d = AboveDoubleRange(s) ? HUGE_VAL : 0.0;
  else if (ec != std::errc())
    return std::nullopt;
  return neg ? -d : d;
}

// All of `s` as an int64 in Python's int() syntax (an optional sign and
// decimal digits): nullopt when it is not one, kOutOfRange beyond int64
// (where Python's unbounded ints would go on).
absl::StatusOr<std::optional<int64_t>> ParseInt(std::string_view s) {
  if (!s.empty() && s[0] == '+') {
    s.remove_prefix(1);
    if (!s.empty() && s[0] == '-') return std::nullopt;
  }
  int64_t x = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
  if (ptr != s.data() + s.size()) return std::nullopt;
  if (ec == std::errc::result_out_of_range)
    return absl::OutOfRangeError(
        absl::StrCat(Quoted(s), " is beyond the 64-bit integer range"));
  if (ec != std::errc()) return std::nullopt;
  return x;
}

// Python's repr(str).
std::string PyRepr(const std::string& s) {
  const char q =
      (s.find('\'') != std::string::npos && s.find('"') == std::string::npos)
          ? '"'
          : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\')
      out += "\\\\";
    else if (c == q)
      out += std::string("\\") + static_cast<char>(c);
    else if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else if (c < 0x20 || c == 0x7f)
      out += absl::StrFormat("\\x%02x", c);
    else
      out.push_back(static_cast<char>(c));
  }
  out.push_back(q);
  return out;
}

std::string Repr(const Value& v);

// str(v) in Python.
std::string Str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kString:
      return v.s;
    default:
      return Repr(v);
  }
}

std::string Repr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return v.b ? "True" : "False";
    case Value::Kind::kInt:
      return absl::StrCat(v.i);
    case Value::Kind::kFloat:
      return PyFloat(v.f);
    case Value::Kind::kString:
      return PyRepr(v.s);
    case Value::Kind::kList: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k)
        absl::StrAppend(&out, k ? ", " : "", Repr((*v.list)[k]));
      return out + "]";
    }
    case Value::Kind::kDict: {
      std::string out = "{";
      for (size_t k = 0; k < v.dict->items.size(); ++k)
        absl::StrAppend(&out, k ? ", " : "", PyRepr(v.dict->items[k].first),
                        ": ", Repr(v.dict->items[k].second));
      return out + "}";
    }
    case Value::Kind::kNamespace:
      return "<Namespace>";
  }
  return "";
}

// Whether `v` holds a namespace (not JSON-serializable in Python; and the only
// mutable value, so the only way to build a cycle).
bool HasNamespace(const Value& v) {
  if (v.kind == Value::Kind::kNamespace) return true;
  if (v.kind == Value::Kind::kList) {
    for (const Value& x : *v.list)
      if (HasNamespace(x)) return true;
  }
  if (v.kind == Value::Kind::kDict) {
    for (const auto& [k, x] : v.dict->items)
      if (HasNamespace(x)) return true;
  }
  return false;
}

// json.dumps(v, ensure_ascii=False) with the default separators (", ", ": "),
// as transformers' tojson filter; `indent` > 0 pretty-prints as Python does.
void ToJson(const Value& v, int indent, int depth, std::string* out) {
  auto newline = [&](int d) {
    if (indent > 0)
      absl::StrAppend(out, "\n",
                      std::string(static_cast<size_t>(indent) * d, ' '));
  };
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      *out += "null";
      return;
    case Value::Kind::kBool:
      *out += v.b ? "true" : "false";
      return;
    case Value::Kind::kInt:
      absl::StrAppend(out, v.i);
      return;
    case Value::Kind::kFloat:
      *out += std::isnan(v.f)   ? "NaN"
              : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity")
                                : PyFloat(v.f);
      return;
    case Value::Kind::kString: {
      *out += '"';
      for (unsigned char c : v.s) {
        switch (c) {
          case '"':
            *out += "\\\"";
            break;
          case '\\':
            *out += "\\\\";
            break;
          case '\n':
            *out += "\\n";
            break;
          case '\r':
            *out += "\\r";
            break;
          case '\t':
            *out += "\\t";
            break;
          case '\b':
            *out += "\\b";
            break;
          case '\f':
            *out += "\\f";
            break;
          default:
            if (c < 0x20)
              absl::StrAppend(out, absl::StrFormat("\\u%04x", c));
            else
              out->push_back(static_cast<char>(c));
        }
      }
      *out += '"';
      return;
    }
    case Value::Kind::kList: {
      if (v.list->empty()) {
        *out += "[]";
        return;
      }
      *out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) *out += indent > 0 ? "," : ", ";
        newline(depth + 1);
        ToJson((*v.list)[k], indent, depth + 1, out);
      }
      newline(depth);
      *out += ']';
      return;
    }
    case Value::Kind::kDict:
    case Value::Kind::kNamespace: {
      if (v.dict->items.empty()) {
        *out += "{}";
        return;
      }
      *out += '{';
      for (size_t k = 0; k < v.dict->items.size(); ++k) {
        if (k) *out += indent > 0 ? "," : ", ";
        newline(depth + 1);
        ToJson(Value::Str(v.dict->items[k].first), 0, 0, out);
        *out += ": ";
        ToJson(v.dict->items[k].second, indent, depth + 1, out);
      }
      newline(depth);
      *out += '}';
      return;
    }
  }
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.b;
    case Value::Kind::kInt:
      return v.i != 0;
    case Value::Kind::kFloat:
      return v.f != 0;
    case Value::Kind::kString:
      return !v.s.empty();
    case Value::Kind::kList:
      return !v.list->empty();
    case Value::Kind::kDict:
      return !v.dict->items.empty();
    case Value::Kind::kNamespace:
      return true;
  }
  return false;
}

// Python's int-float comparison: exact (the int is not rounded to a double,
// the float is not cast to an int outside int64's range); NaN is unordered.
std::partial_ordering CompareIntFloat(int64_t i, double f) {
  if (std::isnan(f)) return std::partial_ordering::unordered;
  if (f >= 0x1p63) return std::partial_ordering::less;
  if (f < -0x1p63) return std::partial_ordering::greater;
  const double t = std::trunc(f);
  const int64_t ti = static_cast<int64_t>(t);  // -2^63 <= t < 2^63
  if (i != ti) return i <=> ti;
  return 0.0 <=> f - t;  // the fraction decides
}

// Python's ordering of two numbers (bools are 0 and 1).
std::partial_ordering CompareNumbers(const Value& a, const Value& b) {
  const bool af = a.is(Value::Kind::kFloat), bf = b.is(Value::Kind::kFloat);
  if (af && bf) return a.f <=> b.f;
  if (!af && !bf) return a.AsInt() <=> b.AsInt();
  return af ? 0 <=> CompareIntFloat(b.AsInt(), a.f)
            : CompareIntFloat(a.AsInt(), b.f);
}

bool Equal(const Value& a, const Value& b) {
  if (a.IsNumber() && b.IsNumber()) return CompareNumbers(a, b) == 0;
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kString:
      return a.s == b.s;
    case Value::Kind::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!Equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Value::Kind::kDict:
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (auto& [k, v] : a.dict->items) {
        Value* o = b.dict->Find(k);
        if (o == nullptr || !Equal(v, *o)) return false;
      }
      return true;
    default:
      return a.dict == b.dict;
  }
}

// Code points of a UTF-8 string (strings index and slice by code point in
// Python).
std::vector<std::string> CodePoints(const std::string& s) {
  std::vector<std::string> out;
  for (size_t k = 0; k < s.size();) {
    const unsigned char c = s[k];
    const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    out.push_back(s.substr(k, n));
    k += n;
  }
  return out;
}

bool IsPySpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' ||
         c == '\f';
}

std::string Strip(const std::string& s, bool left, bool right,
                  const std::optional<std::string>& chars) {
  auto strip_char = [&](char c) {
    return chars ? chars->find(c) != std::string::npos : IsPySpace(c);
  };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && strip_char(s[b])) ++b;
  if (right)
    while (e > b && strip_char(s[e - 1])) --e;
  return s.substr(b, e - b);
}

// ---------------------------------------------------------------------------
// Lexer.

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
    return absl::InvalidArgumentError(absl::StrCat(
        Where(pos), ": ", absl::string_view(msg.data(), msg.size())));
  }
  absl::Status LexTag(size_t* pos, bool block, std::vector<Token>* out,
                      bool* strip_after);
  absl::StatusOr<std::string> LexString(size_t* pos) const;

  const std::string& src_;
};

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
        if (!v || *v > 0x10FFFF)
          return Error(*pos - 2, "invalid escape in string literal");
        append_cp(*v);
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          uint32_t v = e - '0';
          for (int k = 0; k < 2 && *pos < src_.size() && src_[*pos] >= '0' &&
                          src_[*pos] <= '7';
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

absl::Status Lexer::LexTag(size_t* pos, bool block, std::vector<Token>* out,
                           bool* strip_after) {
  const char* end_tag = block ? "%}" : "}}";
  int depth = 0;
  while (true) {
    while (*pos < src_.size() && IsPySpace(src_[*pos])) ++*pos;
    if (*pos >= src_.size())
      return Error(*pos, absl::StrCat("missing '", end_tag, "'"));
    const size_t p = *pos;
    if (depth == 0 && src_.compare(p, 3, std::string("-") + end_tag) == 0) {
      *strip_after = true;
      *pos += 3;
      out->push_back(
          {block ? Token::Kind::kBlockEnd : Token::Kind::kVarEnd, "", 0, 0, p});
      return absl::OkStatus();
    }
    if (depth == 0 && src_.compare(p, 2, end_tag) == 0) {
      *strip_after = false;
      *pos += 2;
      out->push_back(
          {block ? Token::Kind::kBlockEnd : Token::Kind::kVarEnd, "", 0, 0, p});
      return absl::OkStatus();
    }
    const char c = src_[p];
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t e = p;
      while (
          e < src_.size() &&
          (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
        ++e;
      out->push_back({Token::Kind::kName, src_.substr(p, e - p), 0, 0, p});
      *pos = e;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t e = p;
      bool is_float = false;
      while (
          e < src_.size() &&
          (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
        ++e;
      if (e + 1 < src_.size() && src_[e] == '.' &&
          std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
        is_float = true;
        ++e;
        while (e < src_.size() &&
               std::isdigit(static_cast<unsigned char>(src_[e])))
          ++e;
      }
      if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
        size_t x = e + 1;
        if (x < src_.size() && (src_[x] == '+' || src_[x] == '-')) ++x;
        if (x < src_.size() &&
            std::isdigit(static_cast<unsigned char>(src_[x]))) {
          is_float = true;
          e = x;
          while (e < src_.size() &&
                 std::isdigit(static_cast<unsigned char>(src_[e])))
            ++e;
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
          return Error(p, absl::StrCat("float literal ", Quoted(num),
                                       " is beyond the range of a double"));
        t.f = *f;
      } else if (std::from_chars(num.data(), num.data() + num.size(), t.i).ec !=
                 std::errc()) {
        // Python's ints are unbounded, ours are int64.
        return Error(p,
                     absl::StrCat("integer literal ", Quoted(num),
                                  " is too large (at most ", INT64_MAX, ")"));
      }
      out->push_back(std::move(t));
      *pos = e;
    } else if (c == '\'' || c == '"') {
      DMOE_ASSIGN_OR_RETURN(std::string s, LexString(pos));
      out->push_back({Token::Kind::kString, std::move(s), 0, 0, p});
    } else {
      static const char* kOps[] = {
          "//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
          ">",  "(",  ")",  "[",  "]",  "{",  "}", ",", ".", ":", "|", "="};
      const char* op = nullptr;
      for (const char* o : kOps) {
        if (src_.compare(p, std::strlen(o), o) == 0) {
          op = o;
          break;
        }
      }
      if (op == nullptr)
        return Error(
            p, absl::StrCat("unexpected character '", std::string(1, c), "'"));
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
    std::string text = src_.substr(
        pos, tag == std::string::npos ? std::string::npos : tag - pos);
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
      const bool line_start =
          nl != std::string::npos || pos == 0 || src_[pos - 1] == '\n';
      if (line_start &&
          text.find_first_not_of(" \t", from) == std::string::npos)
        text.erase(from);
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
          {kind == '{' ? Token::Kind::kVarBegin : Token::Kind::kBlockBegin, "",
           0, 0, tag});
      DMOE_RETURN_IF_ERROR(LexTag(&pos, kind == '%', out, &strip_after));
    }
    // trim_blocks: the first newline after a block or comment tag.
    if (!strip_after && kind != '{' && pos < src_.size() && src_[pos] == '\n')
      ++pos;
    strip_next = strip_after;
  }
  out->push_back({Token::Kind::kEof, "", 0, 0, src_.size()});
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------
// AST.

struct Expr {
  enum class Kind {
    kLiteral,
    kName,
    kList,
    kDict,
    kTuple,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNot,
    kNeg,
    kPos,
    kBinary,
    kAnd,
    kOr,
    kCond
  };
  Kind kind;
  size_t pos = 0;
  Value literal;
  std::string name;      // kName, kAttr, kFilter, kTest, kBinary (operator)
  bool negated = false;  // kTest: "is not"
  std::vector<std::unique_ptr<Expr>> args;  // operands / call args / elements
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
};

struct ChatTemplate::Node {
  enum class Kind {
    kBody,
    kText,
    kOutput,
    kIf,
    kFor,
    kSet,
    kSetBlock,
    kBreak,
    kContinue
  };
  Kind kind = Kind::kBody;
  size_t pos = 0;
  std::string text;            // kText
  std::unique_ptr<Expr> expr;  // kOutput, kFor (iterable), kSet (value)
  std::vector<std::unique_ptr<Node>> children;  // kBody
  // kIf: conds[k] guards bodies[k]; a body without cond (the else) comes last.
  std::vector<std::unique_ptr<Expr>> conds;
  std::vector<std::unique_ptr<Node>> bodies;
  // kFor: targets (1 or more names), filter, body = bodies[0], else =
  // bodies[1]. kSet / kSetBlock: targets[0] (and attr when setting ns.attr).
  std::vector<std::string> targets;
  std::string attr;
  std::unique_ptr<Expr> filter;
};

namespace {

using Node = ChatTemplate::Node;

class Parser {
 public:
  Parser(const std::vector<Token>& tokens, const Lexer& lexer)
      : t_(tokens), lexer_(lexer) {}

  // Parses until one of `ends` (a block tag name) or the end; *end gets its
  // name.
  absl::StatusOr<std::unique_ptr<Node>> ParseBody(
      const std::vector<std::string>& ends, std::string* end);

 private:
  const Token& Peek(int k = 0) const {
    return t_[std::min(p_ + k, t_.size() - 1)];
  }
  const Token& Next() { return t_[std::min(p_++, t_.size() - 1)]; }
  bool IsOp(std::string_view op, int k = 0) const {
    return Peek(k).kind == Token::Kind::kOp && Peek(k).text == op;
  }
  bool IsName(std::string_view n, int k = 0) const {
    return Peek(k).kind == Token::Kind::kName && Peek(k).text == n;
  }
  absl::Status Error(size_t pos, std::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat(
        lexer_.Where(pos), ": ", absl::string_view(msg.data(), msg.size())));
  }
  absl::Status Expect(std::string_view op) {
    if (!IsOp(op))
      return Error(Peek().pos,
                   absl::StrCat("expected '",
                                absl::string_view(op.data(), op.size()), "'"));
    Next();
    return absl::OkStatus();
  }
  absl::Status ExpectBlockEnd() {
    if (Peek().kind != Token::Kind::kBlockEnd)
      return Error(Peek().pos, "expected '%}'");
    Next();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().kind != Token::Kind::kName)
      return Error(Peek().pos, "expected a name");
    return Next().text;
  }

  absl::StatusOr<std::unique_ptr<Node>> ParseStatement(const std::string& tag,
                                                       size_t pos);
  absl::StatusOr<std::unique_ptr<Expr>>
  ParseExpr();  // with a trailing "if ... else ..."
  absl::StatusOr<std::unique_ptr<Expr>> ParseOr();
  absl::StatusOr<std::unique_ptr<Expr>> ParseAnd();
  absl::StatusOr<std::unique_ptr<Expr>> ParseNot();
  absl::StatusOr<std::unique_ptr<Expr>> ParseCompare();
  absl::StatusOr<std::unique_ptr<Expr>> ParseMath1();
  absl::StatusOr<std::unique_ptr<Expr>> ParseConcat();
  absl::StatusOr<std::unique_ptr<Expr>> ParseMath2();
  absl::StatusOr<std::unique_ptr<Expr>> ParsePow();
  absl::StatusOr<std::unique_ptr<Expr>> ParseUnary();
  absl::StatusOr<std::unique_ptr<Expr>> ParsePrimary();
  absl::StatusOr<std::unique_ptr<Expr>> ParsePostfix(std::unique_ptr<Expr> e);
  absl::StatusOr<std::unique_ptr<Expr>> ParseFilterAndTest(
      std::unique_ptr<Expr> e);
  absl::Status ParseCallArgs(Expr* call);

  static std::unique_ptr<Expr> Make(Expr::Kind k, size_t pos) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->pos = pos;
    return e;
  }
  static std::unique_ptr<Expr> Binary(std::string op, std::unique_ptr<Expr> a,
                                      std::unique_ptr<Expr> b) {
    auto e = Make(Expr::Kind::kBinary, a->pos);
    e->name = std::move(op);
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  const std::vector<Token>& t_;
  const Lexer& lexer_;
  // Recursion depth of the parser (bodies and expressions): templates are
  // small, and a bound keeps a hostile one from exhausting the stack.
  static constexpr int kMaxDepth = 64;
  struct DepthGuard {
    explicit DepthGuard(Parser* p) : parser(p) { ++parser->depth_; }
    ~DepthGuard() { --parser->depth_; }
    Parser* parser;
  };
  size_t p_ = 0;
  int depth_ = 0;
  int loops_ = 0;  // enclosing for loops (break/continue need one)
};

absl::StatusOr<std::unique_ptr<Node>> Parser::ParseBody(
    const std::vector<std::string>& ends, std::string* end) {
  DepthGuard guard(this);
  if (depth_ > kMaxDepth) return Error(Peek().pos, "nesting too deep");
  auto body = std::make_unique<Node>();
  while (true) {
    const Token& tok = Peek();
    if (tok.kind == Token::Kind::kEof) {
      if (!ends.empty())
        return Error(tok.pos, absl::StrCat("missing {% ", ends.back(), " %}"));
      break;
    }
    if (tok.kind == Token::Kind::kText) {
      auto n = std::make_unique<Node>();
      n->kind = Node::Kind::kText;
      n->text = Next().text;
      body->children.push_back(std::move(n));
    } else if (tok.kind == Token::Kind::kVarBegin) {
      Next();
      auto n = std::make_unique<Node>();
      n->kind = Node::Kind::kOutput;
      n->pos = tok.pos;
      DMOE_ASSIGN_OR_RETURN(n->expr, ParseExpr());
      if (Peek().kind != Token::Kind::kVarEnd)
        return Error(Peek().pos, "expected '}}'");
      Next();
      body->children.push_back(std::move(n));
    } else if (tok.kind == Token::Kind::kBlockBegin) {
      const size_t pos = tok.pos;
      Next();
      if (Peek().kind != Token::Kind::kName)
        return Error(Peek().pos, "expected a tag name after '{%'");
      const std::string tag = Peek().text;
      for (const std::string& e : ends) {
        if (tag == e) {
          Next();
          *end = tag;
          return body;
        }
      }
      Next();
      DMOE_ASSIGN_OR_RETURN(auto n, ParseStatement(tag, pos));
      body->children.push_back(std::move(n));
    } else {
      return Error(tok.pos, "unexpected token");
    }
  }
  return body;
}

absl::StatusOr<std::unique_ptr<Node>> Parser::ParseStatement(
    const std::string& tag, size_t pos) {
  auto n = std::make_unique<Node>();
  n->pos = pos;
  std::string end;
  if (tag == "if") {
    n->kind = Node::Kind::kIf;
    DMOE_ASSIGN_OR_RETURN(auto cond, ParseExpr());
    n->conds.push_back(std::move(cond));
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    while (true) {
      DMOE_ASSIGN_OR_RETURN(auto body,
                            ParseBody({"elif", "else", "endif"}, &end));
      n->bodies.push_back(std::move(body));
      if (end == "endif") break;
      if (end == "elif") {
        DMOE_ASSIGN_OR_RETURN(auto c, ParseExpr());
        n->conds.push_back(std::move(c));
        DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
        continue;
      }
      DMOE_RETURN_IF_ERROR(ExpectBlockEnd());  // else
      DMOE_ASSIGN_OR_RETURN(auto else_body, ParseBody({"endif"}, &end));
      n->bodies.push_back(std::move(else_body));
      break;
    }
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }
  if (tag == "for") {
    n->kind = Node::Kind::kFor;
    do {
      DMOE_ASSIGN_OR_RETURN(std::string target, ExpectName());
      n->targets.push_back(std::move(target));
      if (!IsOp(",")) break;
      Next();
    } while (true);
    if (!IsName("in")) return Error(Peek().pos, "expected 'in' in a for tag");
    Next();
    // The iterable: no inline "if" (that is the loop filter).
    DMOE_ASSIGN_OR_RETURN(n->expr, ParseOr());
    if (IsName("if")) {
      Next();
      DMOE_ASSIGN_OR_RETURN(n->filter, ParseOr());
    }
    if (IsName("recursive"))
      return Error(Peek().pos, "unsupported: recursive for loops");
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    ++loops_;
    DMOE_ASSIGN_OR_RETURN(auto body, ParseBody({"else", "endfor"}, &end));
    --loops_;
    n->bodies.push_back(std::move(body));
    if (end == "else") {
      DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
      DMOE_ASSIGN_OR_RETURN(auto else_body, ParseBody({"endfor"}, &end));
      n->bodies.push_back(std::move(else_body));
    }
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }
  if (tag == "set") {
    DMOE_ASSIGN_OR_RETURN(std::string target, ExpectName());
    n->targets.push_back(std::move(target));
    if (IsOp(".")) {
      Next();
      DMOE_ASSIGN_OR_RETURN(n->attr, ExpectName());
    }
    if (IsOp(","))
      return Error(Peek().pos, "unsupported: tuple assignment in set");
    if (IsOp("=")) {
      Next();
      n->kind = Node::Kind::kSet;
      DMOE_ASSIGN_OR_RETURN(n->expr, ParseExpr());
      DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
      return n;
    }
    if (IsOp("|")) return Error(Peek().pos, "unsupported: filtered block set");
    n->kind = Node::Kind::kSetBlock;
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    DMOE_ASSIGN_OR_RETURN(auto body, ParseBody({"endset"}, &end));
    n->bodies.push_back(std::move(body));
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }
  if (tag == "break" || tag == "continue") {
    if (loops_ == 0)
      return Error(pos, absl::StrCat("'", tag, "' outside a for loop"));
    n->kind = tag == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    return n;
  }
  if (tag == "generation") {
    // transformers' AssistantTracker: renders its body unchanged.
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    DMOE_ASSIGN_OR_RETURN(auto body, ParseBody({"endgeneration"}, &end));
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    return body;
  }
  if (tag.rfind("end", 0) == 0 || tag == "elif" || tag == "else")
    return Error(pos, absl::StrCat("unexpected {% ", tag, " %}"));
  return Error(pos, absl::StrCat("unsupported tag '", tag, "'"));
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseExpr() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParseOr());
  if (IsName("if")) {
    const size_t pos = Next().pos;
    auto c = Make(Expr::Kind::kCond, pos);
    DMOE_ASSIGN_OR_RETURN(auto cond, ParseOr());
    std::unique_ptr<Expr> other;
    if (IsName("else")) {
      Next();
      DMOE_ASSIGN_OR_RETURN(other, ParseExpr());
    } else {
      other = Make(Expr::Kind::kLiteral, pos);  // undefined
    }
    c->args.push_back(std::move(cond));
    c->args.push_back(std::move(e));
    c->args.push_back(std::move(other));
    return c;
  }
  return e;
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseOr() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParseAnd());
  while (IsName("or")) {
    Next();
    DMOE_ASSIGN_OR_RETURN(auto r, ParseAnd());
    auto o = Make(Expr::Kind::kOr, e->pos);
    o->args.push_back(std::move(e));
    o->args.push_back(std::move(r));
    e = std::move(o);
  }
  return e;
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseAnd() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParseNot());
  while (IsName("and")) {
    Next();
    DMOE_ASSIGN_OR_RETURN(auto r, ParseNot());
    auto a = Make(Expr::Kind::kAnd, e->pos);
    a->args.push_back(std::move(e));
    a->args.push_back(std::move(r));
    e = std::move(a);
  }
  return e;
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseNot() {
  DepthGuard guard(this);
  if (depth_ > kMaxDepth) return Error(Peek().pos, "expression nests too deep");
  if (IsName("not")) {
    const size_t pos = Next().pos;
    DMOE_ASSIGN_OR_RETURN(auto operand, ParseNot());
    auto n = Make(Expr::Kind::kNot, pos);
    n->args.push_back(std::move(operand));
    return n;
  }
  return ParseCompare();
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseCompare() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParseMath1());
  while (true) {
    std::string op;
    if (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") ||
        IsOp(">=")) {
      op = Next().text;
    } else if (IsName("in")) {
      Next();
      op = "in";
    } else if (IsName("not") && IsName("in", 1)) {
      Next();
      Next();
      op = "not in";
    } else {
      return e;
    }
    DMOE_ASSIGN_OR_RETURN(auto r, ParseMath1());
    // Chained comparisons (a < b < c) are rare in templates: refuse them.
    if (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") ||
        IsOp(">="))
      return Error(Peek().pos, "unsupported: chained comparison");
    e = Binary(op, std::move(e), std::move(r));
  }
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseMath1() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParseConcat());
  while (IsOp("+") || IsOp("-")) {
    std::string op = Next().text;
    DMOE_ASSIGN_OR_RETURN(auto r, ParseConcat());
    e = Binary(op, std::move(e), std::move(r));
  }
  return e;
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseConcat() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParseMath2());
  while (IsOp("~")) {
    Next();
    DMOE_ASSIGN_OR_RETURN(auto r, ParseMath2());
    e = Binary("~", std::move(e), std::move(r));
  }
  return e;
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseMath2() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParsePow());
  while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
    std::string op = Next().text;
    DMOE_ASSIGN_OR_RETURN(auto r, ParsePow());
    e = Binary(op, std::move(e), std::move(r));
  }
  return e;
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParsePow() {
  DMOE_ASSIGN_OR_RETURN(auto e, ParseUnary());
  while (IsOp("**")) {
    Next();
    DMOE_ASSIGN_OR_RETURN(auto r, ParseUnary());
    e = Binary("**", std::move(e), std::move(r));
  }
  return e;
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseUnary() {
  DepthGuard guard(this);
  if (depth_ > kMaxDepth) return Error(Peek().pos, "expression nests too deep");
  if (IsOp("-") || IsOp("+")) {
    const Token& t = Next();
    DMOE_ASSIGN_OR_RETURN(auto operand, ParseUnary());
    auto u = Make(t.text == "-" ? Expr::Kind::kNeg : Expr::Kind::kPos, t.pos);
    u->args.push_back(std::move(operand));
    return ParseFilterAndTest(std::move(u));
  }
  DMOE_ASSIGN_OR_RETURN(auto e, ParsePrimary());
  DMOE_ASSIGN_OR_RETURN(e, ParsePostfix(std::move(e)));
  return ParseFilterAndTest(std::move(e));
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParsePrimary() {
  const Token& t = Peek();
  switch (t.kind) {
    case Token::Kind::kString: {
      auto e = Make(Expr::Kind::kLiteral, t.pos);
      std::string s = Next().text;
      while (Peek().kind == Token::Kind::kString)
        s += Next().text;  // adjacent literals
      e->literal = Value::Str(std::move(s));
      return e;
    }
    case Token::Kind::kInt: {
      auto e = Make(Expr::Kind::kLiteral, t.pos);
      e->literal = Value::Int(Next().i);
      return e;
    }
    case Token::Kind::kFloat: {
      auto e = Make(Expr::Kind::kLiteral, t.pos);
      e->literal = Value::Float(Next().f);
      return e;
    }
    case Token::Kind::kName: {
      const std::string& n = t.text;
      auto e = Make(Expr::Kind::kLiteral, t.pos);
      if (n == "true" || n == "True")
        e->literal = Value::Bool(true);
      else if (n == "false" || n == "False")
        e->literal = Value::Bool(false);
      else if (n == "none" || n == "None")
        e->literal = Value::None();
      else {
        e->kind = Expr::Kind::kName;
        e->name = n;
      }
      Next();
      return e;
    }
    case Token::Kind::kOp:
      if (t.text == "(") {
        const size_t pos = Next().pos;
        if (IsOp(")")) {
          Next();
          return Make(Expr::Kind::kTuple, pos);
        }
        DMOE_ASSIGN_OR_RETURN(auto first, ParseExpr());
        if (!IsOp(",")) {
          DMOE_RETURN_IF_ERROR(Expect(")"));
          return first;
        }
        auto tuple = Make(Expr::Kind::kTuple, pos);
        tuple->args.push_back(std::move(first));
        while (IsOp(",")) {
          Next();
          if (IsOp(")")) break;
          DMOE_ASSIGN_OR_RETURN(auto el, ParseExpr());
          tuple->args.push_back(std::move(el));
        }
        DMOE_RETURN_IF_ERROR(Expect(")"));
        return tuple;
      }
      if (t.text == "[") {
        auto list = Make(Expr::Kind::kList, Next().pos);
        while (!IsOp("]")) {
          DMOE_ASSIGN_OR_RETURN(auto el, ParseExpr());
          list->args.push_back(std::move(el));
          if (!IsOp(",")) break;
          Next();
        }
        DMOE_RETURN_IF_ERROR(Expect("]"));
        return list;
      }
      if (t.text == "{") {
        auto dict = Make(Expr::Kind::kDict, Next().pos);
        while (!IsOp("}")) {
          DMOE_ASSIGN_OR_RETURN(auto k, ParseExpr());
          DMOE_RETURN_IF_ERROR(Expect(":"));
          DMOE_ASSIGN_OR_RETURN(auto v, ParseExpr());
          dict->args.push_back(std::move(k));
          dict->args.push_back(std::move(v));
          if (!IsOp(",")) break;
          Next();
        }
        DMOE_RETURN_IF_ERROR(Expect("}"));
        return dict;
      }
      break;
    default:
      break;
  }
  return Error(t.pos, t.kind == Token::Kind::kOp
                          ? absl::StrCat("unexpected '", t.text, "'")
                          : std::string("expected an expression"));
}

absl::Status Parser::ParseCallArgs(Expr* call) {
  DMOE_RETURN_IF_ERROR(Expect("("));
  while (!IsOp(")")) {
    if (Peek().kind == Token::Kind::kName && IsOp("=", 1)) {
      std::string key = Next().text;
      Next();
      DMOE_ASSIGN_OR_RETURN(auto v, ParseExpr());
      call->kwargs.emplace_back(std::move(key), std::move(v));
    } else {
      if (!call->kwargs.empty())
        return Error(Peek().pos, "positional argument after keyword argument");
      DMOE_ASSIGN_OR_RETURN(auto v, ParseExpr());
      call->args.push_back(std::move(v));
    }
    if (!IsOp(",")) break;
    Next();
  }
  return Expect(")");
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParsePostfix(
    std::unique_ptr<Expr> e) {
  while (true) {
    if (IsOp(".")) {
      const size_t pos = Next().pos;
      auto a = Make(Expr::Kind::kAttr, pos);
      if (Peek().kind == Token::Kind::kInt) {  // x.0 is x[0] in Jinja
        auto idx = Make(Expr::Kind::kLiteral, pos);
        idx->literal = Value::Int(Next().i);
        a->kind = Expr::Kind::kItem;
        a->args.push_back(std::move(e));
        a->args.push_back(std::move(idx));
      } else {
        DMOE_ASSIGN_OR_RETURN(a->name, ExpectName());
        a->args.push_back(std::move(e));
      }
      e = std::move(a);
    } else if (IsOp("[")) {
      const size_t pos = Next().pos;
      // Subscript or slice [a:b:c].
      std::unique_ptr<Expr> parts[3];
      int colons = 0;
      while (true) {
        if (IsOp(":")) {
          if (++colons > 2) return Error(Peek().pos, "too many ':' in a slice");
          Next();
          continue;
        }
        if (IsOp("]")) break;
        if (parts[colons]) return Error(Peek().pos, "expected ']'");
        DMOE_ASSIGN_OR_RETURN(parts[colons], ParseExpr());
      }
      Next();
      if (colons == 0) {
        if (!parts[0]) return Error(pos, "empty subscript");
        auto item = Make(Expr::Kind::kItem, pos);
        item->args.push_back(std::move(e));
        item->args.push_back(std::move(parts[0]));
        e = std::move(item);
      } else {
        auto slice = Make(Expr::Kind::kSlice, pos);
        slice->args.push_back(std::move(e));
        for (auto& part : parts)
          slice->args.push_back(std::move(part));  // may be null
        e = std::move(slice);
      }
    } else if (IsOp("(")) {
      auto call = Make(Expr::Kind::kCall, Peek().pos);
      call->args.push_back(std::move(e));
      DMOE_RETURN_IF_ERROR(ParseCallArgs(call.get()));
      e = std::move(call);
    } else {
      return e;
    }
  }
}

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseFilterAndTest(
    std::unique_ptr<Expr> e) {
  while (true) {
    if (IsOp("|")) {
      const size_t pos = Next().pos;
      auto f = Make(Expr::Kind::kFilter, pos);
      DMOE_ASSIGN_OR_RETURN(f->name, ExpectName());
      f->args.push_back(std::move(e));
      if (IsOp("(")) DMOE_RETURN_IF_ERROR(ParseCallArgs(f.get()));
      e = std::move(f);
      DMOE_ASSIGN_OR_RETURN(e, ParsePostfix(std::move(e)));
    } else if (IsName("is")) {
      const size_t pos = Next().pos;
      auto t = Make(Expr::Kind::kTest, pos);
      if (IsName("not")) {
        Next();
        t->negated = true;
      }
      // "is none"/"is true"/"is false" lex as names.
      DMOE_ASSIGN_OR_RETURN(t->name, ExpectName());
      t->args.push_back(std::move(e));
      if (IsOp("(")) {
        DMOE_RETURN_IF_ERROR(ParseCallArgs(t.get()));
      } else if (Peek().kind == Token::Kind::kString ||
                 Peek().kind == Token::Kind::kInt ||
                 Peek().kind == Token::Kind::kFloat ||
                 (Peek().kind == Token::Kind::kName && !IsName("and") &&
                  !IsName("or") && !IsName("if") && !IsName("else") &&
                  !IsName("is") && !IsName("in") && !IsName("not"))) {
        DMOE_ASSIGN_OR_RETURN(auto arg,
                              ParsePrimary());  // "is sameas false", "is eq 3"
        t->args.push_back(std::move(arg));
      }
      e = std::move(t);
    } else {
      return e;
    }
  }
}

// ---------------------------------------------------------------------------
// Evaluation.

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  ~Renderer() {
    for (auto& ns : namespaces_) ns->items.clear();
  }
  Renderer(const Lexer& lexer, const ojson& context) : lexer_(lexer) {
    scopes_.emplace_back();
    for (auto it = context.begin(); it != context.end(); ++it)
      scopes_[0][it.key()] = FromJson(it.value());
  }

  absl::StatusOr<Flow> Exec(const Node& n, std::string* out);

 private:
  absl::Status Error(size_t pos, std::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat(
        lexer_.Where(pos), ": ", absl::string_view(msg.data(), msg.size())));
  }
  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value::Undefined(name);
  }
  absl::StatusOr<Value> Eval(const Expr& e);
  absl::StatusOr<Value> EvalBinary(const Expr& e, const Value& a,
                                   const Value& b);
  absl::StatusOr<Value> EvalCall(const Expr& e);
  absl::StatusOr<Value> EvalMethod(const Expr& e, const Value& obj,
                                   const std::string& name,
                                   const std::vector<Value>& args);
  absl::StatusOr<Value> EvalFilter(const Expr& e);
  absl::StatusOr<Value> EvalTest(const Expr& e);
  absl::StatusOr<Value> Item(const Expr& e, const Value& obj, const Value& key);
  absl::StatusOr<std::vector<Value>> Iterate(const Expr& e, const Value& v);
  absl::Status NotUndefined(const Expr& e, const Value& v,
                            std::string_view what) const {
    if (!v.is(Value::Kind::kUndefined)) return absl::OkStatus();
    return Error(
        e.pos, absl::StrCat("'", v.s.empty() ? std::string("value") : v.s,
                            "' is undefined (",
                            absl::string_view(what.data(), what.size()), ")"));
  }

  const Lexer& lexer_;
  std::vector<std::map<std::string, Value, std::less<>>> scopes_;
  // Every namespace() of this render: emptied at the end, which breaks the
  // reference cycles a template can build with them ({% set ns.me = ns %}).
  std::vector<std::shared_ptr<Dict>> namespaces_;
};

absl::StatusOr<std::vector<Value>> Renderer::Iterate(const Expr& e,
                                                     const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return std::vector<Value>{};  // Jinja: empty iteration
    case Value::Kind::kList:
      return *v.list;
    case Value::Kind::kDict: {
      std::vector<Value> keys;
      for (auto& [k, _] : v.dict->items) keys.push_back(Value::Str(k));
      return keys;
    }
    case Value::Kind::kString: {
      std::vector<Value> chars;
      for (std::string& c : CodePoints(v.s))
        chars.push_back(Value::Str(std::move(c)));
      return chars;
    }
    default:
      return Error(e.pos, absl::StrCat("cannot iterate over a ", KindName(v)));
  }
}

absl::StatusOr<Flow> Renderer::Exec(const Node& n, std::string* out) {
  switch (n.kind) {
    case Node::Kind::kBody:
      for (const auto& c : n.children) {
        DMOE_ASSIGN_OR_RETURN(Flow f, Exec(*c, out));
        if (f != Flow::kNormal) return f;
      }
      return Flow::kNormal;
    case Node::Kind::kText:
      out->append(n.text);
      return Flow::kNormal;
    case Node::Kind::kOutput: {
      DMOE_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
      out->append(Str(v));
      return Flow::kNormal;
    }
    case Node::Kind::kIf:
      for (size_t k = 0; k < n.bodies.size(); ++k) {
        if (k < n.conds.size()) {
          DMOE_ASSIGN_OR_RETURN(Value c, Eval(*n.conds[k]));
          if (!Truthy(c)) continue;
        }
        return Exec(*n.bodies[k], out);
      }
      return Flow::kNormal;
    case Node::Kind::kFor: {
      DMOE_ASSIGN_OR_RETURN(Value seq, Eval(*n.expr));
      DMOE_ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(*n.expr, seq));
      // Unpack targets and apply the loop filter first: loop.* count filtered
      // items.
      std::vector<std::map<std::string, Value, std::less<>>> frames;
      for (Value& item : items) {
        std::map<std::string, Value, std::less<>> frame;
        if (n.targets.size() == 1) {
          frame[n.targets[0]] = std::move(item);
        } else {
          if (!item.is(Value::Kind::kList) ||
              item.list->size() != n.targets.size())
            return Error(n.pos, absl::StrCat("cannot unpack a ", KindName(item),
                                             " into ", n.targets.size(),
                                             " loop variables"));
          for (size_t k = 0; k < n.targets.size(); ++k)
            frame[n.targets[k]] = (*item.list)[k];
        }
        if (n.filter) {
          scopes_.push_back(frame);
          auto keep = Eval(*n.filter);
          scopes_.pop_back();
          if (!keep.ok()) return keep.status();
          if (!Truthy(*keep)) continue;
        }
        frames.push_back(std::move(frame));
      }
      const int64_t len = static_cast<int64_t>(frames.size());
      for (int64_t k = 0; k < len; ++k) {
        Value loop = Value::NewDict();
        loop.dict->items = {{"index", Value::Int(k + 1)},
                            {"index0", Value::Int(k)},
                            {"first", Value::Bool(k == 0)},
                            {"last", Value::Bool(k == len - 1)},
                            {"length", Value::Int(len)},
                            {"revindex", Value::Int(len - k)},
                            {"revindex0", Value::Int(len - k - 1)}};
        frames[k]["loop"] = std::move(loop);
        scopes_.push_back(std::move(frames[k]));
        auto flow = Exec(*n.bodies[0], out);
        scopes_.pop_back();
        if (!flow.ok()) return flow.status();
        if (*flow == Flow::kBreak) break;
      }
      if (len == 0 && n.bodies.size() > 1) return Exec(*n.bodies[1], out);
      return Flow::kNormal;
    }
    case Node::Kind::kSet:
    case Node::Kind::kSetBlock: {
      Value v;
      if (n.kind == Node::Kind::kSet) {
        DMOE_ASSIGN_OR_RETURN(v, Eval(*n.expr));
      } else {
        std::string captured;
        DMOE_ASSIGN_OR_RETURN(Flow f, Exec(*n.bodies[0], &captured));
        (void)f;
        v = Value::Str(std::move(captured));
      }
      if (n.attr.empty()) {
        scopes_.back()[n.targets[0]] = std::move(v);
        return Flow::kNormal;
      }
      Value ns = Lookup(n.targets[0]);
      if (!ns.is(Value::Kind::kNamespace))
        return Error(
            n.pos, absl::StrCat("cannot set attribute '", n.attr, "' of '",
                                n.targets[0],
                                "': only namespace() objects take attributes"));
      if (Value* slot = ns.dict->Find(n.attr))
        *slot = std::move(v);
      else
        ns.dict->items.emplace_back(n.attr, std::move(v));
      return Flow::kNormal;
    }
    case Node::Kind::kBreak:
      return Flow::kBreak;
    case Node::Kind::kContinue:
      return Flow::kContinue;
  }
  return Flow::kNormal;
}

absl::StatusOr<Value> Renderer::Item(const Expr& e, const Value& obj,
                                     const Value& key) {
  DMOE_RETURN_IF_ERROR(NotUndefined(e, obj, "subscript"));
  std::string what = obj.is(Value::Kind::kUndefined) ? "" : Str(key);
  if (obj.is(Value::Kind::kDict) || obj.is(Value::Kind::kNamespace)) {
    if (!key.is(Value::Kind::kString)) return Value::Undefined(Repr(key));
    if (Value* v = obj.dict->Find(key.s)) return *v;
    return Value::Undefined(key.s);
  }
  if (obj.is(Value::Kind::kList) || obj.is(Value::Kind::kString)) {
    if (!key.is(Value::Kind::kInt)) return Value::Undefined(Repr(key));
    std::vector<std::string> chars;
    int64_t size;
    if (obj.is(Value::Kind::kString)) {
      chars = CodePoints(obj.s);
      size = static_cast<int64_t>(chars.size());
    } else {
      size = static_cast<int64_t>(obj.list->size());
    }
    int64_t k = key.i < 0 ? key.i + size : key.i;
    if (k < 0 || k >= size)
      return Value::Undefined(absl::StrCat("index ", key.i));
    return obj.is(Value::Kind::kString) ? Value::Str(chars[k]) : (*obj.list)[k];
  }
  return Error(e.pos, absl::StrCat("cannot subscript a ", KindName(obj)));
}

absl::StatusOr<Value> Renderer::Eval(const Expr& e) {
  switch (e.kind) {
    case Expr::Kind::kLiteral:
      return e.literal;
    case Expr::Kind::kName:
      return Lookup(e.name);
    case Expr::Kind::kList:
    case Expr::Kind::kTuple: {
      Value v = Value::NewList();
      for (const auto& a : e.args) {
        DMOE_ASSIGN_OR_RETURN(Value x, Eval(*a));
        v.list->push_back(std::move(x));
      }
      return v;
    }
    case Expr::Kind::kDict: {
      Value v = Value::NewDict();
      for (size_t k = 0; k < e.args.size(); k += 2) {
        DMOE_ASSIGN_OR_RETURN(Value key, Eval(*e.args[k]));
        if (!key.is(Value::Kind::kString))
          return Error(e.args[k]->pos, "dict keys must be strings");
        DMOE_ASSIGN_OR_RETURN(Value x, Eval(*e.args[k + 1]));
        if (Value* slot = v.dict->Find(key.s))
          *slot = std::move(x);
        else
          v.dict->items.emplace_back(key.s, std::move(x));
      }
      return v;
    }
    case Expr::Kind::kAttr: {
      DMOE_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
      DMOE_RETURN_IF_ERROR(
          NotUndefined(e, obj, absl::StrCat("attribute '", e.name, "'")));
      if (obj.is(Value::Kind::kDict) || obj.is(Value::Kind::kNamespace)) {
        if (Value* v = obj.dict->Find(e.name)) return *v;
      }
      return Value::Undefined(e.name);
    }
    case Expr::Kind::kItem: {
      DMOE_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
      DMOE_ASSIGN_OR_RETURN(Value key, Eval(*e.args[1]));
      return Item(e, obj, key);
    }
    case Expr::Kind::kSlice: {
      DMOE_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
      std::optional<int64_t> bounds[3];
      for (int k = 0; k < 3; ++k) {
        if (!e.args[k + 1]) continue;
        DMOE_ASSIGN_OR_RETURN(Value b, Eval(*e.args[k + 1]));
        if (b.is(Value::Kind::kNone)) continue;
        if (!b.is(Value::Kind::kInt))
          return Error(e.pos, "slice bounds must be integers");
        bounds[k] = b.i;
      }
      std::vector<Value> items;
      if (obj.is(Value::Kind::kString)) {
        for (std::string& c : CodePoints(obj.s))
          items.push_back(Value::Str(std::move(c)));
      } else if (obj.is(Value::Kind::kList)) {
        items = *obj.list;
      } else {
        return Error(e.pos, absl::StrCat("cannot slice a ", KindName(obj)));
      }
      // Python's slice.indices.
      const int64_t n = static_cast<int64_t>(items.size());
      const int64_t step = bounds[2].value_or(1);
      if (step == 0) return Error(e.pos, "slice step cannot be zero");
      auto clamp = [&](std::optional<int64_t> b, int64_t def) {
        if (!b) return def;
        int64_t x = *b < 0 ? *b + n : *b;
        if (step > 0) return std::clamp<int64_t>(x, 0, n);
        return std::clamp<int64_t>(x, -1, n - 1);
      };
      const int64_t start = clamp(bounds[0], step > 0 ? 0 : n - 1);
      const int64_t stop = clamp(bounds[1], step > 0 ? n : -1);
      std::vector<Value> picked;
      for (int64_t k = start; step > 0 ? k < stop : k > stop;) {
        picked.push_back(items[k]);
        if (__builtin_add_overflow(k, step, &k)) break;  // past `stop` too
      }
      if (obj.is(Value::Kind::kString)) {
        std::string s;
        for (const Value& c : picked) s += c.s;
        return Value::Str(std::move(s));
      }
      return Value::NewList(std::move(picked));
    }
    case Expr::Kind::kCall:
      return EvalCall(e);
    case Expr::Kind::kFilter:
      return EvalFilter(e);
    case Expr::Kind::kTest:
      return EvalTest(e);
    case Expr::Kind::kNot: {
      DMOE_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
      return Value::Bool(!Truthy(v));
    }
    case Expr::Kind::kNeg:
    case Expr::Kind::kPos: {
      DMOE_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
      if (v.is(Value::Kind::kInt)) {
        if (e.kind == Expr::Kind::kNeg && v.i == INT64_MIN)
          return Error(e.pos, absl::StrCat("integer overflow: -(", v.i,
                                           ") is beyond the 64-bit range"));
        return Value::Int(e.kind == Expr::Kind::kNeg ? -v.i : v.i);
      }
      if (v.is(Value::Kind::kFloat))
        return Value::Float(e.kind == Expr::Kind::kNeg ? -v.f : v.f);
      return Error(
          e.pos,
          absl::StrCat("bad operand type for unary minus/plus: ", KindName(v)));
    }
    case Expr::Kind::kAnd: {
      DMOE_ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
      if (!Truthy(a)) return a;
      return Eval(*e.args[1]);
    }
    case Expr::Kind::kOr: {
      DMOE_ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
      if (Truthy(a)) return a;
      return Eval(*e.args[1]);
    }
    case Expr::Kind::kCond: {
      DMOE_ASSIGN_OR_RETURN(Value c, Eval(*e.args[0]));
      return Eval(*e.args[Truthy(c) ? 1 : 2]);
    }
    case Expr::Kind::kBinary: {
      DMOE_ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
      DMOE_ASSIGN_OR_RETURN(Value b, Eval(*e.args[1]));
      return EvalBinary(e, a, b);
    }
  }
  return Error(e.pos, "internal: unknown expression");
}

// Python's int arithmetic on int64: an error where the exact result leaves
// int64 (Python's ints are unbounded; a wrapped or undefined result never
// comes out). The message has no position: the caller adds it.
absl::StatusOr<Value> IntArithmetic(const std::string& op, int64_t x,
                                    int64_t y) {
  auto overflow = [&] {
    return absl::OutOfRangeError(absl::StrCat("integer overflow: ", x, " ", op,
                                              " ", y,
                                              " is beyond the 64-bit range"));
  };
  int64_t r = 0;
  if (op == "+") {
    if (__builtin_add_overflow(x, y, &r)) return overflow();
    return Value::Int(r);
  }
  if (op == "-") {
    if (__builtin_sub_overflow(x, y, &r)) return overflow();
    return Value::Int(r);
  }
  if (op == "*") {
    if (__builtin_mul_overflow(x, y, &r)) return overflow();
    return Value::Int(r);
  }
  if (op == "**") {
    if (y < 0) {  // a float in Python
      if (x == 0)
        return absl::InvalidArgumentError(
            "0 cannot be raised to a negative power");
      return Value::Float(
          std::pow(static_cast<double>(x), static_cast<double>(y)));
    }
    // Squaring: once base * base overflows with exponent bits left, the
    // result (at least base squared, as |base| >= 2 there) overflows too.
    int64_t base = x;
    r = 1;
    for (int64_t n = y; n > 0; n >>= 1) {
      if ((n & 1) && __builtin_mul_overflow(r, base, &r)) return overflow();
      if (n > 1 && __builtin_mul_overflow(base, base, &base)) return overflow();
    }
    return Value::Int(r);
  }
  if (op == "/" || op == "//" || op == "%") {
    if (y == 0) return absl::InvalidArgumentError("division by zero");
    if (op == "/")
      return Value::Float(static_cast<double>(x) / static_cast<double>(y));
    if (op == "//") {
      if (x == INT64_MIN && y == -1) return overflow();
      return Value::Int(x / y - ((x % y != 0) && ((x < 0) != (y < 0))));
    }
    if (y == -1) return Value::Int(0);  // INT64_MIN % -1 is undefined in C++
    r = x % y;
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return Value::Int(r);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported operator '", op, "'"));
}

// Python's float arithmetic: IEEE for + - * / (1e308 * 10 is inf in Python
// too), errors where Python raises (a negative or fractional power that has
// no real value, ** overflowing, division by zero).
absl::StatusOr<Value> FloatArithmetic(const std::string& op, double x,
                                      double y) {
  if (op == "+") return Value::Float(x + y);
  if (op == "-") return Value::Float(x - y);
  if (op == "*") return Value::Float(x * y);
  if (op == "**") {
    if (x == 0 && y < 0)
      return absl::InvalidArgumentError(
          "0.0 cannot be raised to a negative power");
    if (x < 0 && std::isfinite(y) && y != std::trunc(y))
      return absl::InvalidArgumentError(absl::StrCat(
          PyFloat(x), " ** ", PyFloat(y), " is complex (unsupported)"));
    const double r = std::pow(x, y);
    if (std::isinf(r) && std::isfinite(x) && std::isfinite(y))
      return absl::OutOfRangeError(
          absl::StrCat("float overflow: ", PyFloat(x), " ** ", PyFloat(y)));
    return Value::Float(r);
  }
  if (op == "/" || op == "//" || op == "%") {
    if (y == 0) return absl::InvalidArgumentError("division by zero");
    if (op == "/") return Value::Float(x / y);
    if (op == "//") return Value::Float(std::floor(x / y));
    double r = std::fmod(x, y);
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return Value::Float(r);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported operator '", op, "'"));
}

absl::StatusOr<Value> Renderer::EvalBinary(const Expr& e, const Value& a,
                                           const Value& b) {
  const std::string& op = e.name;
  if (op == "==") return Value::Bool(Equal(a, b));
  if (op == "!=") return Value::Bool(!Equal(a, b));
  if (op == "~") return Value::Str(Str(a) + Str(b));
  if (op == "in" || op == "not in") {
    bool found = false;
    if (b.is(Value::Kind::kString)) {
      if (!a.is(Value::Kind::kString))
        return Error(e.pos,
                     absl::StrCat("'in <string>' requires a string, not a ",
                                  KindName(a)));
      found = b.s.find(a.s) != std::string::npos;
    } else if (b.is(Value::Kind::kList)) {
      for (const Value& x : *b.list) found = found || Equal(a, x);
    } else if (b.is(Value::Kind::kDict) || b.is(Value::Kind::kNamespace)) {
      found = a.is(Value::Kind::kString) && b.dict->Find(a.s) != nullptr;
    } else if (b.is(Value::Kind::kUndefined)) {
      return Error(e.pos,
                   absl::StrCat("'", b.s, "' is undefined (operand of 'in')"));
    } else {
      return Error(e.pos, absl::StrCat("argument of type ", KindName(b),
                                       " is not iterable"));
    }
    return Value::Bool(op == "in" ? found : !found);
  }
  // Arithmetic and ordering: undefined operands fail as in Jinja.
  if (a.is(Value::Kind::kUndefined) || b.is(Value::Kind::kUndefined)) {
    const Value& u = a.is(Value::Kind::kUndefined) ? a : b;
    return Error(e.pos, absl::StrCat("'", u.s, "' is undefined (operand of '",
                                     op, "')"));
  }
  if (op == "<" || op == ">" || op == "<=" || op == ">=") {
    std::partial_ordering cmp = std::partial_ordering::unordered;
    if (a.IsNumber() && b.IsNumber()) {
      cmp = CompareNumbers(a, b);  // NaN: every comparison is false
    } else if (a.is(Value::Kind::kString) && b.is(Value::Kind::kString)) {
      cmp = a.s <=> b.s;
    } else {
      return Error(e.pos, absl::StrCat("'", op, "' not supported between ",
                                       KindName(a), " and ", KindName(b)));
    }
    const bool r = op == "<"    ? cmp < 0
                   : op == ">"  ? cmp > 0
                   : op == "<=" ? cmp <= 0
                                : cmp >= 0;
    return Value::Bool(r);
  }
  if (op == "+") {
    if (a.is(Value::Kind::kString) && b.is(Value::Kind::kString))
      return Value::Str(a.s + b.s);
    if (a.is(Value::Kind::kList) && b.is(Value::Kind::kList)) {
      List l = *a.list;
      l.insert(l.end(), b.list->begin(), b.list->end());
      return Value::NewList(std::move(l));
    }
  }
  if (op == "*" && ((a.is(Value::Kind::kString) && b.is(Value::Kind::kInt)) ||
                    (a.is(Value::Kind::kInt) && b.is(Value::Kind::kString)))) {
    const std::string& s = a.is(Value::Kind::kString) ? a.s : b.s;
    const int64_t n = a.is(Value::Kind::kInt) ? a.i : b.i;
    std::string out;
    if (s.empty()) return Value::Str(std::move(out));  // n may be 2^63 - 1
    for (int64_t k = 0; k < n && out.size() < (1 << 24); ++k) out += s;
    return Value::Str(std::move(out));
  }
  if (a.IsNumber() && b.IsNumber()) {
    // int op int stays an int (exact or an error), any float makes it float.
    absl::StatusOr<Value> r =
        a.is(Value::Kind::kFloat) || b.is(Value::Kind::kFloat)
            ? FloatArithmetic(op, a.AsDouble(), b.AsDouble())
            : IntArithmetic(op, a.AsInt(), b.AsInt());
    if (!r.ok()) return Error(e.pos, std::string(r.status().message()));
    return r;
  }
  return Error(e.pos, absl::StrCat("unsupported operand types for '", op,
                                   "': ", KindName(a), " and ", KindName(b)));
}

absl::StatusOr<Value> Renderer::EvalCall(const Expr& e) {
  const Expr& callee = *e.args[0];
  std::vector<Value> args;
  for (size_t k = 1; k < e.args.size(); ++k) {
    DMOE_ASSIGN_OR_RETURN(Value v, Eval(*e.args[k]));
    args.push_back(std::move(v));
  }
  std::vector<std::pair<std::string, Value>> kwargs;
  for (const auto& [key, x] : e.kwargs) {
    DMOE_ASSIGN_OR_RETURN(Value v, Eval(*x));
    kwargs.emplace_back(key, std::move(v));
  }
  if (callee.kind == Expr::Kind::kAttr) {
    DMOE_ASSIGN_OR_RETURN(Value obj, Eval(*callee.args[0]));
    if (!kwargs.empty())
      return Error(e.pos, absl::StrCat("method '", callee.name,
                                       "' takes no keyword arguments"));
    return EvalMethod(e, obj, callee.name, args);
  }
  if (callee.kind != Expr::Kind::kName ||
      !Lookup(callee.name).is(Value::Kind::kUndefined))
    return Error(e.pos,
                 "only namespace(), range(), dict() and raise_exception() can "
                 "be called");
  const std::string& fn = callee.name;
  if (fn == "namespace" || fn == "dict") {
    Value ns = Value::NewDict(fn == "namespace" ? Value::Kind::kNamespace
                                                : Value::Kind::kDict);
    if (ns.is(Value::Kind::kNamespace)) namespaces_.push_back(ns.dict);
    if (!args.empty()) {
      if (args.size() != 1 || !args[0].is(Value::Kind::kDict))
        return Error(
            e.pos, absl::StrCat(fn, "() takes keyword arguments or one dict"));
      ns.dict->items = args[0].dict->items;
    }
    for (auto& [k, v] : kwargs) {
      if (Value* slot = ns.dict->Find(k))
        *slot = std::move(v);
      else
        ns.dict->items.emplace_back(k, std::move(v));
    }
    return ns;
  }
  if (fn == "range") {
    if (args.empty() || args.size() > 3 || !kwargs.empty())
      return Error(e.pos, "range() takes 1 to 3 integers");
    for (const Value& a : args)
      if (!a.is(Value::Kind::kInt))
        return Error(e.pos, "range() takes integers");
    const int64_t start = args.size() > 1 ? args[0].i : 0;
    const int64_t stop = args.size() > 1 ? args[1].i : args[0].i;
    const int64_t step = args.size() > 2 ? args[2].i : 1;
    if (step == 0) return Error(e.pos, "range() step must not be zero");
    Value l = Value::NewList();
    for (int64_t k = start; step > 0 ? k < stop : k > stop;) {
      if (l.list->size() >= 1000000) return Error(e.pos, "range() too large");
      l.list->push_back(Value::Int(k));
      // Past int64 is past `stop` too.
      if (__builtin_add_overflow(k, step, &k)) break;
    }
    return l;
  }
  if (fn == "raise_exception") {
    return absl::InvalidArgumentError(absl::StrCat(
        "chat template raised: ", args.empty() ? std::string() : Str(args[0])));
  }
  return Error(e.pos, absl::StrCat("unsupported function '", fn, "'"));
}

absl::StatusOr<Value> Renderer::EvalMethod(const Expr& e, const Value& obj,
                                           const std::string& name,
                                           const std::vector<Value>& args) {
  DMOE_RETURN_IF_ERROR(
      NotUndefined(e, obj, absl::StrCat("method '", name, "'")));
  auto str_arg = [&](size_t k) -> std::optional<std::string> {
    if (k < args.size() && args[k].is(Value::Kind::kString)) return args[k].s;
    return std::nullopt;
  };
  if (obj.is(Value::Kind::kString)) {
    const std::string& s = obj.s;
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return Value::Str(
          Strip(s, name != "rstrip", name != "lstrip", str_arg(0)));
    if (name == "lower" || name == "upper") {
      std::string r = s;
      for (char& c : r)
        c = name == "lower" ? std::tolower(static_cast<unsigned char>(c))
                            : std::toupper(static_cast<unsigned char>(c));
      return Value::Str(std::move(r));
    }
    if (name == "startswith" || name == "endswith") {
      auto p = str_arg(0);
      if (!p) return Error(e.pos, absl::StrCat(name, "() takes a string"));
      const bool r = name == "startswith" ? s.compare(0, p->size(), *p) == 0
                                          : s.size() >= p->size() &&
                                                s.compare(s.size() - p->size(),
                                                          p->size(), *p) == 0;
      return Value::Bool(r);
    }
    if (name == "split") {
      Value l = Value::NewList();
      auto sep = str_arg(0);
      if (!sep) {  // split on runs of whitespace
        size_t k = 0;
        while (k < s.size()) {
          while (k < s.size() && IsPySpace(s[k])) ++k;
          size_t b = k;
          while (k < s.size() && !IsPySpace(s[k])) ++k;
          if (k > b) l.list->push_back(Value::Str(s.substr(b, k - b)));
        }
        return l;
      }
      if (sep->empty()) return Error(e.pos, "split(): empty separator");
      size_t b = 0;
      for (size_t f; (f = s.find(*sep, b)) != std::string::npos;
           b = f + sep->size())
        l.list->push_back(Value::Str(s.substr(b, f - b)));
      l.list->push_back(Value::Str(s.substr(b)));
      return l;
    }
    if (name == "replace") {
      auto from = str_arg(0), to = str_arg(1);
      if (!from || !to) return Error(e.pos, "replace() takes two strings");
      std::string r;
      if (from->empty())
        return Error(e.pos, "replace(): empty pattern is unsupported");
      size_t b = 0;
      for (size_t f; (f = s.find(*from, b)) != std::string::npos;
           b = f + from->size())
        r += s.substr(b, f - b) + *to;
      r += s.substr(b);
      return Value::Str(std::move(r));
    }
    if (name == "title" || name == "capitalize") {
      std::string r = s;
      bool start = true;
      for (size_t k = 0; k < r.size(); ++k) {
        const unsigned char c = r[k];
        if (std::isalpha(c)) {
          r[k] = start ? std::toupper(c) : std::tolower(c);
          start = false;
        } else if (name == "title") {
          start = true;
        }
      }
      return Value::Str(std::move(r));
    }
  }
  if (obj.is(Value::Kind::kDict)) {
    if (name == "items" || name == "keys" || name == "values") {
      Value l = Value::NewList();
      for (auto& [k, v] : obj.dict->items) {
        if (name == "keys")
          l.list->push_back(Value::Str(k));
        else if (name == "values")
          l.list->push_back(v);
        else
          l.list->push_back(Value::NewList({Value::Str(k), v}));
      }
      return l;
    }
    if (name == "get") {
      auto key = str_arg(0);
      if (!key) return Error(e.pos, "get() takes a string key");
      if (Value* v = obj.dict->Find(*key)) return *v;
      return args.size() > 1 ? args[1] : Value::None();
    }
  }
  return Error(e.pos, absl::StrCat("unsupported method '", name, "' of a ",
                                   KindName(obj)));
}

absl::StatusOr<Value> Renderer::EvalFilter(const Expr& e) {
  const std::string& f = e.name;
  DMOE_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
  std::vector<Value> args;
  for (size_t k = 1; k < e.args.size(); ++k) {
    DMOE_ASSIGN_OR_RETURN(Value a, Eval(*e.args[k]));
    args.push_back(std::move(a));
  }
  auto kwarg = [&](std::string_view key) -> const Expr* {
    for (const auto& [k, x] : e.kwargs)
      if (k == key) return x.get();
    return nullptr;
  };
  if (f == "default" || f == "d") {
    bool boolean = args.size() > 1 && Truthy(args[1]);
    if (const Expr* b = kwarg("boolean")) {
      DMOE_ASSIGN_OR_RETURN(Value bv, Eval(*b));
      boolean = Truthy(bv);
    }
    const bool use_default =
        v.is(Value::Kind::kUndefined) || (boolean && !Truthy(v));
    return use_default ? (args.empty() ? Value::Str("") : args[0]) : v;
  }
  if (f == "safe") return v;
  if (f == "string") return Value::Str(Str(v));
  if (f == "tojson") {
    int64_t indent = 0;
    if (!args.empty() && args[0].is(Value::Kind::kInt)) indent = args[0].i;
    if (const Expr* x = kwarg("indent")) {
      DMOE_ASSIGN_OR_RETURN(Value iv, Eval(*x));
      if (iv.is(Value::Kind::kInt)) indent = iv.i;
    }
    // indent * depth spaces per line: bounded so that neither overflows nor
    // asks for more memory than exists.
    constexpr int64_t kMaxIndent = 1024;
    if (indent > kMaxIndent)
      return Error(e.pos,
                   absl::StrCat("tojson: indent ", indent,
                                " is too large (at most ", kMaxIndent, ")"));
    for (const auto& [k, _] : e.kwargs)
      if (k != "indent")
        return Error(e.pos,
                     absl::StrCat("tojson: unsupported argument '", k, "'"));
    if (HasNamespace(v))
      return Error(e.pos, "tojson: a namespace is not JSON serializable");
    std::string out;
    ToJson(v, static_cast<int>(indent), 0, &out);
    return Value::Str(std::move(out));
  }
  if (!e.kwargs.empty())
    return Error(e.pos,
                 absl::StrCat("filter '", f, "' takes no keyword arguments"));
  if (f == "length" || f == "count") {
    switch (v.kind) {
      case Value::Kind::kUndefined:
        return Value::Int(0);
      case Value::Kind::kString:
        return Value::Int(static_cast<int64_t>(CodePoints(v.s).size()));
      case Value::Kind::kList:
        return Value::Int(static_cast<int64_t>(v.list->size()));
      case Value::Kind::kDict:
        return Value::Int(static_cast<int64_t>(v.dict->items.size()));
      default:
        return Error(e.pos, absl::StrCat("a ", KindName(v), " has no length"));
    }
  }
  if (f == "trim") {
    const std::optional<std::string> chars =
        !args.empty() && args[0].is(Value::Kind::kString)
            ? std::optional<std::string>(args[0].s)
            : std::nullopt;
    return Value::Str(Strip(Str(v), true, true, chars));
  }
  if (f == "lower" || f == "upper" || f == "capitalize" || f == "title") {
    Value s = Value::Str(Str(v));
    if (f == "capitalize") {
      DMOE_ASSIGN_OR_RETURN(Value lowered, EvalMethod(e, s, "lower", {}));
      DMOE_ASSIGN_OR_RETURN(Value cap,
                            EvalMethod(e, lowered, "capitalize", {}));
      return cap;
    }
    return EvalMethod(e, s, f, {});
  }
  if (f == "replace") {
    if (args.size() != 2) return Error(e.pos, "replace takes two arguments");
    return EvalMethod(e, Value::Str(Str(v)), "replace", args);
  }
  if (f == "int") {
    // Jinja's do_int: int(value), else int(float(value)) ("42.5" is 42),
    // else the default (0). Where Python's unbounded int would go beyond
    // int64 (1e300, "1" followed by 30 zeros) it is an error here, as is
    // inf (OverflowError in Python); NaN gives the default, as in Jinja.
    const Value fallback = args.empty() ? Value::Int(0) : args[0];
    if (v.is(Value::Kind::kInt) || v.is(Value::Kind::kBool))
      return Value::Int(v.AsInt());
    double x;
    if (v.is(Value::Kind::kFloat)) {
      x = v.f;
    } else if (v.is(Value::Kind::kString)) {
      const std::string s = Strip(v.s, true, true, std::nullopt);
      absl::StatusOr<std::optional<int64_t>> i = ParseInt(s);
      if (!i.ok())
        return Error(e.pos, absl::StrCat("int: ", i.status().message()));
      if (*i) return Value::Int(**i);
      const std::optional<double> d = ParseDouble(s);
      if (!d) return fallback;
      x = *d;
    } else {
      return fallback;
    }
    if (std::isnan(x)) return fallback;
    if (!(x >= -0x1p63 && x < 0x1p63))
      return Error(e.pos, absl::StrCat("int: ", PyFloat(x),
                                       " is beyond the 64-bit integer range"));
    return Value::Int(static_cast<int64_t>(x));
  }
  if (f == "float") {
    // Jinja's do_float: float(value), else the default (0.0).
    if (v.IsNumber()) return Value::Float(v.AsDouble());
    if (v.is(Value::Kind::kString)) {
      if (std::optional<double> d =
              ParseDouble(Strip(v.s, true, true, std::nullopt)))
        return Value::Float(*d);
    }
    return args.empty() ? Value::Float(0.0) : args[0];
  }
  if (f == "list" || f == "reverse" || f == "first" || f == "last" ||
      f == "join" || f == "items") {
    if (f == "items") {
      if (!v.is(Value::Kind::kDict)) return Error(e.pos, "items needs a dict");
      return EvalMethod(e, v, "items", {});
    }
    if (f == "reverse" && v.is(Value::Kind::kString)) {
      std::vector<std::string> cps = CodePoints(v.s);
      std::string r;
      for (auto it = cps.rbegin(); it != cps.rend(); ++it) r += *it;
      return Value::Str(std::move(r));
    }
    DMOE_ASSIGN_OR_RETURN(std::vector<Value> items, Iterate(e, v));
    if (f == "list") return Value::NewList(std::move(items));
    if (f == "reverse")
      return Value::NewList(std::vector<Value>(items.rbegin(), items.rend()));
    if (f == "first")
      return items.empty() ? Value::Undefined("first") : items.front();
    if (f == "last")
      return items.empty() ? Value::Undefined("last") : items.back();
    const std::string sep = args.empty() ? "" : Str(args[0]);
    std::string out;
    for (size_t k = 0; k < items.size(); ++k)
      absl::StrAppend(&out, k ? sep : "", Str(items[k]));
    return Value::Str(std::move(out));
  }
  return Error(e.pos, absl::StrCat("unsupported filter '", f, "'"));
}

absl::StatusOr<Value> Renderer::EvalTest(const Expr& e) {
  DMOE_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
  std::vector<Value> args;
  for (size_t k = 1; k < e.args.size(); ++k) {
    DMOE_ASSIGN_OR_RETURN(Value a, Eval(*e.args[k]));
    args.push_back(std::move(a));
  }
  const std::string& t = e.name;
  bool r;
  using K = Value::Kind;
  if (t == "defined")
    r = !v.is(K::kUndefined);
  else if (t == "undefined")
    r = v.is(K::kUndefined);
  else if (t == "none")
    r = v.is(K::kNone);
  else if (t == "string")
    r = v.is(K::kString);
  else if (t == "number")
    r = v.is(K::kInt) || v.is(K::kFloat);
  else if (t == "integer")
    r = v.is(K::kInt);
  else if (t == "float")
    r = v.is(K::kFloat);
  else if (t == "boolean")
    r = v.is(K::kBool);
  else if (t == "true")
    r = v.is(K::kBool) && v.b;
  else if (t == "false")
    r = v.is(K::kBool) && !v.b;
  else if (t == "mapping")
    r = v.is(K::kDict);
  else if (t == "sequence")
    r = v.is(K::kList) || v.is(K::kString) || v.is(K::kDict);
  else if (t == "iterable")
    r = v.is(K::kList) || v.is(K::kString) || v.is(K::kDict);
  else if (t == "odd" || t == "even") {
    if (!v.is(K::kInt))
      return Error(e.pos, absl::StrCat("test '", t, "' needs an integer"));
    r = (v.i % 2 != 0) == (t == "odd");
  } else if (t == "eq" || t == "equalto" || t == "==" || t == "sameas") {
    if (args.size() != 1)
      return Error(e.pos, absl::StrCat("test '", t, "' takes one argument"));
    r = Equal(v, args[0]) && (t != "sameas" || v.kind == args[0].kind);
  } else {
    return Error(e.pos, absl::StrCat("unsupported test '", t, "'"));
  }
  return Value::Bool(e.negated ? !r : r);
}

// Jinja normalizes newlines to \n and drops one trailing newline of the
// template.
std::string NormalizeNewlines(std::string_view src) {
  std::string out;
  out.reserve(src.size());
  for (size_t k = 0; k < src.size(); ++k) {
    if (src[k] == '\r') {
      out.push_back('\n');
      if (k + 1 < src.size() && src[k + 1] == '\n') ++k;
    } else {
      out.push_back(src[k]);
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

}  // namespace

ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Parse(
    std::string_view source) {
  auto t = std::unique_ptr<ChatTemplate>(new ChatTemplate());
  auto holder = std::make_unique<Node>();
  holder->kind = Node::Kind::kText;  // holder->text keeps the normalized source
  holder->text = NormalizeNewlines(source);
  Lexer lexer(holder->text);
  std::vector<Token> tokens;
  DMOE_RETURN_IF_ERROR(lexer.Run(&tokens));
  Parser parser(tokens, lexer);
  std::string end;
  DMOE_ASSIGN_OR_RETURN(auto body, parser.ParseBody({}, &end));
  // root_ = a body whose `text` holds the source and whose child 0 is the tree.
  holder->kind = Node::Kind::kBody;
  holder->children.push_back(std::move(body));
  t->root_ = std::move(holder);
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(
    const nlohmann::ordered_json& context) const {
  if (!context.is_object())
    return absl::InvalidArgumentError(
        "chat template context must be a JSON object");
  Lexer lexer(root_->text);
  Renderer r(lexer, context);
  std::string out;
  DMOE_ASSIGN_OR_RETURN(Flow f, r.Exec(*root_->children[0], &out));
  (void)f;
  return out;
}

absl::StatusOr<std::string> ApplyChatTemplate(
    const Tokenizer& tokenizer, const nlohmann::ordered_json& messages,
    bool add_generation_prompt, const nlohmann::ordered_json& extra) {
  if (tokenizer.chat_template().empty())
    return absl::FailedPreconditionError(
        "the tokenizer has no chat_template (tokenizer_config.json)");
  DMOE_ASSIGN_OR_RETURN(auto tmpl,
                        ChatTemplate::Parse(tokenizer.chat_template()));
  ojson context = ojson::object();
  context["messages"] = messages;
  context["add_generation_prompt"] = add_generation_prompt;
  context["bos_token"] = tokenizer.bos_token();
  context["eos_token"] = tokenizer.eos_token();
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it)
      context[it.key()] = it.value();
  return tmpl->Render(context);
}

}  // namespace dmoe::text
