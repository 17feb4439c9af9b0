// Internal to dmoe_text (namespace dmoe::text::jinja): the chat template's
// parser, not an API. Include only from text/chat_template.cc and text/jinja/.
//
// Contract: Parser takes the tokens of Lexer::Run and that lexer (for
// positions; both must outlive it) and gives the syntax tree (ast.h) of the
// Jinja subset that text/chat_template.h lists. ParseBody({}, &end) parses a
// whole template. Errors are INVALID_ARGUMENT "chat template line L col C:
// <what>": syntax errors ("expected '%}'", ...), tags outside the subset
// (macros, include, call blocks, ...), break/continue outside a loop, and
// nesting beyond kMaxDepth (a bound against stack exhaustion). Names only
// known at render time (filters, tests, methods, globals) are the renderer's
// to reject.
#ifndef DMOE_TEXT_JINJA_PARSER_H_
#define DMOE_TEXT_JINJA_PARSER_H_

#include <algorithm>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "text/jinja/ast.h"
#include "text/jinja/lexer.h"

namespace dmoe::text::jinja {

class Parser {
 public:
  Parser(const std::vector<Token>& tokens, const Lexer& lexer) : t_(tokens), lexer_(lexer) {}

  // Parses until one of `ends` (a block tag name) or the end; *end gets its
  // name.
  absl::StatusOr<std::unique_ptr<Node>> ParseBody(const std::vector<std::string>& ends,
                                                  std::string* end);

 private:
  const Token& Peek(int k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  const Token& Next() { return t_[std::min(p_++, t_.size() - 1)]; }
  bool IsOp(std::string_view op, int k = 0) const {
    return Peek(k).kind == Token::Kind::kOp && Peek(k).text == op;
  }
  bool IsName(std::string_view n, int k = 0) const {
    return Peek(k).kind == Token::Kind::kName && Peek(k).text == n;
  }
  absl::Status Error(size_t pos, std::string_view msg) const {
    return absl::InvalidArgumentError(
        absl::StrCat(lexer_.Where(pos), ": ", absl::string_view(msg.data(), msg.size())));
  }
  absl::Status Expect(std::string_view op) {
    if (!IsOp(op))
      return Error(Peek().pos,
                   absl::StrCat("expected '", absl::string_view(op.data(), op.size()), "'"));
    Next();
    return absl::OkStatus();
  }
  absl::Status ExpectBlockEnd() {
    if (Peek().kind != Token::Kind::kBlockEnd) return Error(Peek().pos, "expected '%}'");
    Next();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().kind != Token::Kind::kName) return Error(Peek().pos, "expected a name");
    return Next().text;
  }

  absl::StatusOr<std::unique_ptr<Node>> ParseStatement(const std::string& tag, size_t pos);
  absl::StatusOr<std::unique_ptr<Expr>> ParseExpr();  // with a trailing "if ... else ..."
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
  absl::StatusOr<std::unique_ptr<Expr>> ParseFilterAndTest(std::unique_ptr<Expr> e);
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

}  // namespace dmoe::text::jinja

#endif  // DMOE_TEXT_JINJA_PARSER_H_
