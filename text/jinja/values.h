// Internal to dmoe_text (namespace dmoe::text::jinja): the chat template's
// values, not an API. Include only from text/chat_template.cc and text/jinja/.
//
// Contract: Value is what a Jinja (Python) value is while a template renders:
// undefined (carrying the name it was looked up by), None, bool, int (int64),
// float (double), str (UTF-8 bytes), list (tuples too), dict (insertion
// ordered) and namespace. Lists, dicts and namespaces are shared by reference
// (shared_ptr), as in Python; a namespace is the one value a template can
// change in place. The helpers below give Python's view of a value: str(),
// repr(), truthiness, ==, number ordering, json.dumps (transformers'
// `tojson`), float()/int() parsing, str.strip and code-point splitting.
// They never throw. The only Status they return is ParseInt's: OUT_OF_RANGE
// "'<literal>' is beyond the 64-bit integer range" (the literal cut by
// Quoted). Callers that report an error add the template position themselves
// (see lexer.h, Lexer::Where).
#ifndef DMOE_TEXT_JINJA_VALUES_H_
#define DMOE_TEXT_JINJA_VALUES_H_

#include <compare>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace dmoe::text::jinja {

using ojson = nlohmann::ordered_json;

struct Value;
using List = std::vector<Value>;
struct Dict {
  std::vector<std::pair<std::string, Value>> items;  // insertion order, as Python
  Value* Find(std::string_view key);
};

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;               // kString; for kUndefined the name, for messages
  std::shared_ptr<List> list;  // kList (tuples too)
  std::shared_ptr<Dict> dict;  // kDict, kNamespace (namespaces are mutable in place)

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
  double AsDouble() const { return kind == Kind::kFloat ? f : kind == Kind::kBool ? b : i; }
  // kInt or kBool (Python's bools are the ints 0 and 1).
  int64_t AsInt() const { return kind == Kind::kBool ? b : i; }
};

// The name of v's kind as error messages print it ("int", "dict", ...).
const char* KindName(const Value& v);

// A JSON value (a render context) as Jinja sees it: objects keep their key
// order; unsigned integers above int64 become the nearest float.
Value FromJson(const ojson& j);

// Python's repr(float): shortest round-trip digits, exponent form below 1e-4
// and from 1e16.
std::string PyFloat(double x);

// A literal or input quoted for an error message, cut when long (a fuzzer's
// 100,000-digit number should not make a 100 KB message).
std::string Quoted(std::string_view s);

// All of `s` as Python's float() reads it: nullopt when it is not such a
// number; beyond double's range is +-inf and below it 0, as in Python.
std::optional<double> ParseDouble(std::string_view s);

// All of `s` as an int64 in Python's int() syntax (an optional sign and
// decimal digits): nullopt when it is not one, OUT_OF_RANGE beyond int64
// (where Python's unbounded ints would go on).
absl::StatusOr<std::optional<int64_t>> ParseInt(std::string_view s);

// str(v) in Python (undefined is "").
std::string Str(const Value& v);
// repr(v) in Python (None, True, ['a'], {'k': 1}).
std::string Repr(const Value& v);

// Whether `v` holds a namespace (not JSON-serializable in Python; and the only
// mutable value, so the only way to build a cycle).
bool HasNamespace(const Value& v);

// json.dumps(v, ensure_ascii=False) with the default separators (", ", ": "),
// as transformers' tojson filter; `indent` > 0 pretty-prints as Python does.
// Appends to *out. `v` must not hold a namespace (check HasNamespace).
void ToJson(const Value& v, int indent, int depth, std::string* out);

// Python's truthiness (undefined is false).
bool Truthy(const Value& v);

// Python's ordering of two numbers (bools are 0 and 1); NaN is unordered.
std::partial_ordering CompareNumbers(const Value& a, const Value& b);

// Python's == (numbers across int, float and bool; strings, lists and dicts
// by value; namespaces by identity).
bool Equal(const Value& a, const Value& b);

// Code points of a UTF-8 string (strings index and slice by code point in
// Python).
std::vector<std::string> CodePoints(const std::string& s);

// Whether c is Python whitespace: ' ', \t, \n, \r, \v or \f (what the lexer
// skips in tags and Strip strips without `chars`).
bool IsPySpace(char c);

// Python's str.strip / lstrip / rstrip (`left`, `right`) of `chars`, or of
// whitespace when nullopt.
std::string Strip(const std::string& s, bool left, bool right,
                  const std::optional<std::string>& chars);

}  // namespace dmoe::text::jinja

#endif  // DMOE_TEXT_JINJA_VALUES_H_
