#include "text/jinja/values.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 at -O3 reports `"-" + out` in PyFloat as an overlapping memcpy
// (-Wrestrict, a known false positive located in <string>'s char_traits.h)
// once PyFloat has external linkage here; silenced before the includes.
#pragma GCC diagnostic ignored "-Wrestrict"
#endif

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

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmoe::text::jinja {

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
  auto r = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // "-1.2345e+05"
  const size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  // to_chars wrote the exponent as [+-]digits; from_chars takes no '+'.
  int exp = 0;
  std::from_chars(sci.data() + e + 1 + (sci[e + 1] == '+'), sci.data() + sci.size(), exp);
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

namespace {

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
    if (std::from_chars(x.data(), x.data() + x.size(), exp).ec != std::errc()) exp = INT64_MAX / 2;
    // Far beyond any double either way, and lead + exp below cannot overflow
    // (lead is bounded by the literal's length).
    exp = std::min<int64_t>(exp, INT64_MAX / 2);
    if (neg) exp = -exp;
  }
  const size_t dot = std::min(mant.find('.'), mant.size());
  const size_t first = mant.find_first_not_of("0.");
  if (first == std::string_view::npos) return false;  // zero
  const int64_t lead =
      first < dot ? static_cast<int64_t>(dot - first) - 1 : -static_cast<int64_t>(first - dot);
  return lead + exp > 0;
}

}  // namespace

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
    return absl::OutOfRangeError(absl::StrCat(Quoted(s), " is beyond the 64-bit integer range"));
  if (ec != std::errc()) return std::nullopt;
  return x;
}

namespace {

// Python's repr(str).
std::string PyRepr(const std::string& s) {
  const char q =
      (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
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

}  // namespace

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
        absl::StrAppend(&out, k ? ", " : "", PyRepr(v.dict->items[k].first), ": ",
                        Repr(v.dict->items[k].second));
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
    if (indent > 0) absl::StrAppend(out, "\n", std::string(static_cast<size_t>(indent) * d, ' '));
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

namespace {

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

}  // namespace

// Python's ordering of two numbers (bools are 0 and 1).
std::partial_ordering CompareNumbers(const Value& a, const Value& b) {
  const bool af = a.is(Value::Kind::kFloat), bf = b.is(Value::Kind::kFloat);
  if (af && bf) return a.f <=> b.f;
  if (!af && !bf) return a.AsInt() <=> b.AsInt();
  return af ? 0 <=> CompareIntFloat(b.AsInt(), a.f) : CompareIntFloat(a.AsInt(), b.f);
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
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
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

}  // namespace dmoe::text::jinja
