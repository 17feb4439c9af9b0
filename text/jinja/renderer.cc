#include "text/jinja/renderer.h"

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

#include "absl/strings/str_format.h"
#include "core/status.h"

namespace dmoe::text::jinja {

absl::StatusOr<std::vector<Value>> Renderer::Iterate(const Expr& e, const Value& v) {
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
      if (v.s.size() > kMaxListItems) {
        return Error(e.pos, absl::StrCat("iterating over a string of ", v.s.size(),
                                         " bytes: over the limit of ", kMaxListItems, " items"));
      }
      std::vector<Value> chars;
      for (std::string& c : CodePoints(v.s)) chars.push_back(Value::Str(std::move(c)));
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
      if (out->size() > kMaxOutputBytes) return OutputTooLong(n.pos, out->size());
      return Flow::kNormal;
    case Node::Kind::kOutput: {
      DMOE_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
      out->append(Str(v));
      if (out->size() > kMaxOutputBytes) return OutputTooLong(n.expr->pos, out->size());
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
          if (!item.is(Value::Kind::kList) || item.list->size() != n.targets.size())
            return Error(n.pos, absl::StrCat("cannot unpack a ", KindName(item), " into ",
                                             n.targets.size(), " loop variables"));
          for (size_t k = 0; k < n.targets.size(); ++k) frame[n.targets[k]] = (*item.list)[k];
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
        loop.dict->items = {
            {"index", Value::Int(k + 1)},          {"index0", Value::Int(k)},
            {"first", Value::Bool(k == 0)},        {"last", Value::Bool(k == len - 1)},
            {"length", Value::Int(len)},           {"revindex", Value::Int(len - k)},
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
        return Error(n.pos, absl::StrCat("cannot set attribute '", n.attr, "' of '", n.targets[0],
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

absl::StatusOr<Value> Renderer::Item(const Expr& e, const Value& obj, const Value& key) {
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
    if (k < 0 || k >= size) return Value::Undefined(absl::StrCat("index ", key.i));
    return obj.is(Value::Kind::kString) ? Value::Str(chars[k]) : (*obj.list)[k];
  }
  return Error(e.pos, absl::StrCat("cannot subscript a ", KindName(obj)));
}

absl::StatusOr<Value> Renderer::Eval(const Expr& e) {
  DMOE_ASSIGN_OR_RETURN(Value v, EvalUnchecked(e));
  if (v.is(Value::Kind::kString) && v.s.size() > kMaxStringBytes) {
    return Error(e.pos, absl::StrCat("a string of ", v.s.size(), " bytes is over the limit of ",
                                     kMaxStringBytes, " bytes"));
  }
  if (v.is(Value::Kind::kList) && v.list->size() > kMaxListItems) {
    return Error(e.pos, absl::StrCat("a list of ", v.list->size(), " items is over the limit of ",
                                     kMaxListItems, " items"));
  }
  return v;
}

absl::StatusOr<Value> Renderer::EvalUnchecked(const Expr& e) {
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
      DMOE_RETURN_IF_ERROR(NotUndefined(e, obj, absl::StrCat("attribute '", e.name, "'")));
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
        if (!b.is(Value::Kind::kInt)) return Error(e.pos, "slice bounds must be integers");
        bounds[k] = b.i;
      }
      std::vector<Value> items;
      if (obj.is(Value::Kind::kString)) {
        for (std::string& c : CodePoints(obj.s)) items.push_back(Value::Str(std::move(c)));
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
          return Error(e.pos,
                       absl::StrCat("integer overflow: -(", v.i, ") is beyond the 64-bit range"));
        return Value::Int(e.kind == Expr::Kind::kNeg ? -v.i : v.i);
      }
      if (v.is(Value::Kind::kFloat)) return Value::Float(e.kind == Expr::Kind::kNeg ? -v.f : v.f);
      return Error(e.pos, absl::StrCat("bad operand type for unary minus/plus: ", KindName(v)));
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
absl::StatusOr<Value> IntArithmetic(const std::string& op, int64_t x, int64_t y) {
  auto overflow = [&] {
    return absl::OutOfRangeError(
        absl::StrCat("integer overflow: ", x, " ", op, " ", y, " is beyond the 64-bit range"));
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
      if (x == 0) return absl::InvalidArgumentError("0 cannot be raised to a negative power");
      return Value::Float(std::pow(static_cast<double>(x), static_cast<double>(y)));
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
    if (op == "/") return Value::Float(static_cast<double>(x) / static_cast<double>(y));
    if (op == "//") {
      if (x == INT64_MIN && y == -1) return overflow();
      return Value::Int(x / y - ((x % y != 0) && ((x < 0) != (y < 0))));
    }
    if (y == -1) return Value::Int(0);  // INT64_MIN % -1 is undefined in C++
    r = x % y;
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return Value::Int(r);
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported operator '", op, "'"));
}

// Python's float arithmetic: IEEE for + - * / (1e308 * 10 is inf in Python
// too), errors where Python raises (a negative or fractional power that has
// no real value, ** overflowing, division by zero).
absl::StatusOr<Value> FloatArithmetic(const std::string& op, double x, double y) {
  if (op == "+") return Value::Float(x + y);
  if (op == "-") return Value::Float(x - y);
  if (op == "*") return Value::Float(x * y);
  if (op == "**") {
    if (x == 0 && y < 0)
      return absl::InvalidArgumentError("0.0 cannot be raised to a negative power");
    if (x < 0 && std::isfinite(y) && y != std::trunc(y))
      return absl::InvalidArgumentError(
          absl::StrCat(PyFloat(x), " ** ", PyFloat(y), " is complex (unsupported)"));
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
  return absl::InvalidArgumentError(absl::StrCat("unsupported operator '", op, "'"));
}

absl::StatusOr<Value> Renderer::EvalBinary(const Expr& e, const Value& a, const Value& b) {
  const std::string& op = e.name;
  if (op == "==") return Value::Bool(Equal(a, b));
  if (op == "!=") return Value::Bool(!Equal(a, b));
  if (op == "~") return Value::Str(Str(a) + Str(b));
  if (op == "in" || op == "not in") {
    bool found = false;
    if (b.is(Value::Kind::kString)) {
      if (!a.is(Value::Kind::kString))
        return Error(e.pos, absl::StrCat("'in <string>' requires a string, not a ", KindName(a)));
      found = b.s.find(a.s) != std::string::npos;
    } else if (b.is(Value::Kind::kList)) {
      for (const Value& x : *b.list) found = found || Equal(a, x);
    } else if (b.is(Value::Kind::kDict) || b.is(Value::Kind::kNamespace)) {
      found = a.is(Value::Kind::kString) && b.dict->Find(a.s) != nullptr;
    } else if (b.is(Value::Kind::kUndefined)) {
      return Error(e.pos, absl::StrCat("'", b.s, "' is undefined (operand of 'in')"));
    } else {
      return Error(e.pos, absl::StrCat("argument of type ", KindName(b), " is not iterable"));
    }
    return Value::Bool(op == "in" ? found : !found);
  }
  // Arithmetic and ordering: undefined operands fail as in Jinja.
  if (a.is(Value::Kind::kUndefined) || b.is(Value::Kind::kUndefined)) {
    const Value& u = a.is(Value::Kind::kUndefined) ? a : b;
    return Error(e.pos, absl::StrCat("'", u.s, "' is undefined (operand of '", op, "')"));
  }
  if (op == "<" || op == ">" || op == "<=" || op == ">=") {
    std::partial_ordering cmp = std::partial_ordering::unordered;
    if (a.IsNumber() && b.IsNumber()) {
      cmp = CompareNumbers(a, b);  // NaN: every comparison is false
    } else if (a.is(Value::Kind::kString) && b.is(Value::Kind::kString)) {
      cmp = a.s <=> b.s;
    } else {
      return Error(e.pos, absl::StrCat("'", op, "' not supported between ", KindName(a), " and ",
                                       KindName(b)));
    }
    const bool r = op == "<" ? cmp < 0 : op == ">" ? cmp > 0 : op == "<=" ? cmp <= 0 : cmp >= 0;
    return Value::Bool(r);
  }
  if (op == "+") {
    if (a.is(Value::Kind::kString) && b.is(Value::Kind::kString)) return Value::Str(a.s + b.s);
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
    absl::StatusOr<Value> r = a.is(Value::Kind::kFloat) || b.is(Value::Kind::kFloat)
                                  ? FloatArithmetic(op, a.AsDouble(), b.AsDouble())
                                  : IntArithmetic(op, a.AsInt(), b.AsInt());
    if (!r.ok()) return Error(e.pos, std::string(r.status().message()));
    return r;
  }
  return Error(e.pos, absl::StrCat("unsupported operand types for '", op, "': ", KindName(a),
                                   " and ", KindName(b)));
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
      return Error(e.pos, absl::StrCat("method '", callee.name, "' takes no keyword arguments"));
    return EvalMethod(e, obj, callee.name, args);
  }
  if (callee.kind != Expr::Kind::kName || !Lookup(callee.name).is(Value::Kind::kUndefined))
    return Error(e.pos,
                 "only namespace(), range(), dict() and raise_exception() can "
                 "be called");
  const std::string& fn = callee.name;
  if (fn == "namespace" || fn == "dict") {
    Value ns = Value::NewDict(fn == "namespace" ? Value::Kind::kNamespace : Value::Kind::kDict);
    if (ns.is(Value::Kind::kNamespace)) namespaces_.push_back(ns.dict);
    if (!args.empty()) {
      if (args.size() != 1 || !args[0].is(Value::Kind::kDict))
        return Error(e.pos, absl::StrCat(fn, "() takes keyword arguments or one dict"));
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
      if (!a.is(Value::Kind::kInt)) return Error(e.pos, "range() takes integers");
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
    return absl::InvalidArgumentError(
        absl::StrCat("chat template raised: ", args.empty() ? std::string() : Str(args[0])));
  }
  return Error(e.pos, absl::StrCat("unsupported function '", fn, "'"));
}

absl::StatusOr<Value> Renderer::EvalMethod(const Expr& e, const Value& obj, const std::string& name,
                                           const std::vector<Value>& args) {
  DMOE_RETURN_IF_ERROR(NotUndefined(e, obj, absl::StrCat("method '", name, "'")));
  auto str_arg = [&](size_t k) -> std::optional<std::string> {
    if (k < args.size() && args[k].is(Value::Kind::kString)) return args[k].s;
    return std::nullopt;
  };
  if (obj.is(Value::Kind::kString)) {
    const std::string& s = obj.s;
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return Value::Str(Strip(s, name != "rstrip", name != "lstrip", str_arg(0)));
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
                                                s.compare(s.size() - p->size(), p->size(), *p) == 0;
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
          if (l.list->size() > kMaxListItems) break;  // Eval reports it
        }
        return l;
      }
      if (sep->empty()) return Error(e.pos, "split(): empty separator");
      size_t b = 0;
      for (size_t f; (f = s.find(*sep, b)) != std::string::npos; b = f + sep->size()) {
        l.list->push_back(Value::Str(s.substr(b, f - b)));
        if (l.list->size() > kMaxListItems) return l;  // Eval reports it
      }
      l.list->push_back(Value::Str(s.substr(b)));
      return l;
    }
    if (name == "replace") {
      auto from = str_arg(0), to = str_arg(1);
      if (!from || !to) return Error(e.pos, "replace() takes two strings");
      std::string r;
      if (from->empty()) return Error(e.pos, "replace(): empty pattern is unsupported");
      size_t b = 0;
      for (size_t f; (f = s.find(*from, b)) != std::string::npos; b = f + from->size()) {
        r += s.substr(b, f - b) + *to;
        if (r.size() > kMaxStringBytes) return Value::Str(std::move(r));  // Eval reports it
      }
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
  return Error(e.pos, absl::StrCat("unsupported method '", name, "' of a ", KindName(obj)));
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
    const bool use_default = v.is(Value::Kind::kUndefined) || (boolean && !Truthy(v));
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
      return Error(e.pos, absl::StrCat("tojson: indent ", indent, " is too large (at most ",
                                       kMaxIndent, ")"));
    for (const auto& [k, _] : e.kwargs)
      if (k != "indent")
        return Error(e.pos, absl::StrCat("tojson: unsupported argument '", k, "'"));
    if (HasNamespace(v)) return Error(e.pos, "tojson: a namespace is not JSON serializable");
    std::string out;
    ToJson(v, static_cast<int>(indent), 0, &out);
    return Value::Str(std::move(out));
  }
  if (!e.kwargs.empty())
    return Error(e.pos, absl::StrCat("filter '", f, "' takes no keyword arguments"));
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
    const std::optional<std::string> chars = !args.empty() && args[0].is(Value::Kind::kString)
                                                 ? std::optional<std::string>(args[0].s)
                                                 : std::nullopt;
    return Value::Str(Strip(Str(v), true, true, chars));
  }
  if (f == "lower" || f == "upper" || f == "capitalize" || f == "title") {
    Value s = Value::Str(Str(v));
    if (f == "capitalize") {
      DMOE_ASSIGN_OR_RETURN(Value lowered, EvalMethod(e, s, "lower", {}));
      DMOE_ASSIGN_OR_RETURN(Value cap, EvalMethod(e, lowered, "capitalize", {}));
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
    if (v.is(Value::Kind::kInt) || v.is(Value::Kind::kBool)) return Value::Int(v.AsInt());
    double x;
    if (v.is(Value::Kind::kFloat)) {
      x = v.f;
    } else if (v.is(Value::Kind::kString)) {
      const std::string s = Strip(v.s, true, true, std::nullopt);
      absl::StatusOr<std::optional<int64_t>> i = ParseInt(s);
      if (!i.ok()) return Error(e.pos, absl::StrCat("int: ", i.status().message()));
      if (*i) return Value::Int(**i);
      const std::optional<double> d = ParseDouble(s);
      if (!d) return fallback;
      x = *d;
    } else {
      return fallback;
    }
    if (std::isnan(x)) return fallback;
    if (!(x >= -0x1p63 && x < 0x1p63))
      return Error(e.pos, absl::StrCat("int: ", PyFloat(x), " is beyond the 64-bit integer range"));
    return Value::Int(static_cast<int64_t>(x));
  }
  if (f == "float") {
    // Jinja's do_float: float(value), else the default (0.0).
    if (v.IsNumber()) return Value::Float(v.AsDouble());
    if (v.is(Value::Kind::kString)) {
      if (std::optional<double> d = ParseDouble(Strip(v.s, true, true, std::nullopt)))
        return Value::Float(*d);
    }
    return args.empty() ? Value::Float(0.0) : args[0];
  }
  if (f == "list" || f == "reverse" || f == "first" || f == "last" || f == "join" || f == "items") {
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
    if (f == "reverse") return Value::NewList(std::vector<Value>(items.rbegin(), items.rend()));
    if (f == "first") return items.empty() ? Value::Undefined("first") : items.front();
    if (f == "last") return items.empty() ? Value::Undefined("last") : items.back();
    const std::string sep = args.empty() ? "" : Str(args[0]);
    std::string out;
    for (size_t k = 0; k < items.size() && out.size() <= kMaxStringBytes; ++k) {
      absl::StrAppend(&out, k ? sep : "", Str(items[k]));  // over the limit: Eval reports it
    }
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
    if (!v.is(K::kInt)) return Error(e.pos, absl::StrCat("test '", t, "' needs an integer"));
    r = (v.i % 2 != 0) == (t == "odd");
  } else if (t == "eq" || t == "equalto" || t == "==" || t == "sameas") {
    if (args.size() != 1) return Error(e.pos, absl::StrCat("test '", t, "' takes one argument"));
    r = Equal(v, args[0]) && (t != "sameas" || v.kind == args[0].kind);
  } else {
    return Error(e.pos, absl::StrCat("unsupported test '", t, "'"));
  }
  return Value::Bool(e.negated ? !r : r);
}

}  // namespace dmoe::text::jinja
