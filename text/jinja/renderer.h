// Internal to dmoe_text (namespace dmoe::text::jinja): the chat template's
// renderer, not an API. Include only from text/chat_template.cc and
// text/jinja/.
//
// Contract: a Renderer takes the lexer of the template's source (for
// positions) and a render context (a JSON object, whose keys become the
// global variables: FromJson of each value), both outliving it. Exec renders
// a parsed tree (ast.h) and appends the output to *out, with Python's
// semantics for values (values.h), loop.*, namespace(), the filters, tests,
// methods and globals that text/chat_template.h lists. It gives the control
// flow that left the node (kBreak / kContinue out of a loop body; kNormal for
// a whole template). Errors are INVALID_ARGUMENT "chat template line L col C:
// <what>" for evaluation errors and names outside the subset;
// raise_exception(msg) is INVALID_ARGUMENT with msg alone. A string over
// kMaxStringBytes, a list over kMaxListItems or an output over
// kMaxOutputBytes is INVALID_ARGUMENT naming the limit. One Renderer
// renders once, on one thread; a tree may render on several at once.
#ifndef DMOE_TEXT_JINJA_RENDERER_H_
#define DMOE_TEXT_JINJA_RENDERER_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "text/jinja/ast.h"
#include "text/jinja/lexer.h"
#include "text/jinja/values.h"

namespace dmoe::text::jinja {

enum class Flow { kNormal, kBreak, kContinue };

// Bounds on what a template can build, so that a hostile or broken template
// (a checkpoint's tokenizer_config.json) gets an error instead of exhausting
// memory: chained split / join / concatenation grows strings geometrically.
inline constexpr size_t kMaxStringBytes = size_t{16} << 20;  // one value
inline constexpr size_t kMaxListItems = size_t{1} << 20;     // one list
inline constexpr size_t kMaxOutputBytes = size_t{64} << 20;  // the rendered text

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
  absl::Status OutputTooLong(size_t pos, size_t bytes) const {
    return Error(pos, absl::StrCat("the rendered text reached ", bytes,
                                   " bytes, over the limit of ", kMaxOutputBytes, " bytes"));
  }
  absl::Status Error(size_t pos, std::string_view msg) const {
    return absl::InvalidArgumentError(
        absl::StrCat(lexer_.Where(pos), ": ", absl::string_view(msg.data(), msg.size())));
  }
  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value::Undefined(name);
  }
  // Eval checks every value it returns against the limits below;
  // EvalUnchecked is the evaluation itself.
  absl::StatusOr<Value> Eval(const Expr& e);
  absl::StatusOr<Value> EvalUnchecked(const Expr& e);
  absl::StatusOr<Value> EvalBinary(const Expr& e, const Value& a, const Value& b);
  absl::StatusOr<Value> EvalCall(const Expr& e);
  absl::StatusOr<Value> EvalMethod(const Expr& e, const Value& obj, const std::string& name,
                                   const std::vector<Value>& args);
  absl::StatusOr<Value> EvalFilter(const Expr& e);
  absl::StatusOr<Value> EvalTest(const Expr& e);
  absl::StatusOr<Value> Item(const Expr& e, const Value& obj, const Value& key);
  absl::StatusOr<std::vector<Value>> Iterate(const Expr& e, const Value& v);
  absl::Status NotUndefined(const Expr& e, const Value& v, std::string_view what) const {
    if (!v.is(Value::Kind::kUndefined)) return absl::OkStatus();
    return Error(e.pos,
                 absl::StrCat("'", v.s.empty() ? std::string("value") : v.s, "' is undefined (",
                              absl::string_view(what.data(), what.size()), ")"));
  }

  const Lexer& lexer_;
  std::vector<std::map<std::string, Value, std::less<>>> scopes_;
  // Every namespace() of this render: emptied at the end, which breaks the
  // reference cycles a template can build with them ({% set ns.me = ns %}).
  std::vector<std::shared_ptr<Dict>> namespaces_;
};

}  // namespace dmoe::text::jinja

#endif  // DMOE_TEXT_JINJA_RENDERER_H_
