#include "text/jinja/parser.h"

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

#include "core/status.h"
#include "text/jinja/values.h"

namespace dmoe::text::jinja {

absl::StatusOr<std::unique_ptr<Node>> Parser::ParseBody(const std::vector<std::string>& ends,
                                                        std::string* end) {
  DepthGuard guard(this);
  if (depth_ > kMaxDepth) return Error(Peek().pos, "nesting too deep");
  auto body = std::make_unique<Node>();
  while (true) {
    const Token& tok = Peek();
    if (tok.kind == Token::Kind::kEof) {
      if (!ends.empty()) return Error(tok.pos, absl::StrCat("missing {% ", ends.back(), " %}"));
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
      if (Peek().kind != Token::Kind::kVarEnd) return Error(Peek().pos, "expected '}}'");
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

absl::StatusOr<std::unique_ptr<Node>> Parser::ParseStatement(const std::string& tag, size_t pos) {
  auto n = std::make_unique<Node>();
  n->pos = pos;
  std::string end;
  if (tag == "if") {
    n->kind = Node::Kind::kIf;
    DMOE_ASSIGN_OR_RETURN(auto cond, ParseExpr());
    n->conds.push_back(std::move(cond));
    DMOE_RETURN_IF_ERROR(ExpectBlockEnd());
    while (true) {
      DMOE_ASSIGN_OR_RETURN(auto body, ParseBody({"elif", "else", "endif"}, &end));
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
    if (IsName("recursive")) return Error(Peek().pos, "unsupported: recursive for loops");
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
    if (IsOp(",")) return Error(Peek().pos, "unsupported: tuple assignment in set");
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
    if (loops_ == 0) return Error(pos, absl::StrCat("'", tag, "' outside a for loop"));
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
    if (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") || IsOp(">=")) {
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
    if (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") || IsOp(">="))
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
      while (Peek().kind == Token::Kind::kString) s += Next().text;  // adjacent literals
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
  return Error(t.pos, t.kind == Token::Kind::kOp ? absl::StrCat("unexpected '", t.text, "'")
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

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParsePostfix(std::unique_ptr<Expr> e) {
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
        for (auto& part : parts) slice->args.push_back(std::move(part));  // may be null
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

absl::StatusOr<std::unique_ptr<Expr>> Parser::ParseFilterAndTest(std::unique_ptr<Expr> e) {
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
      } else if (Peek().kind == Token::Kind::kString || Peek().kind == Token::Kind::kInt ||
                 Peek().kind == Token::Kind::kFloat ||
                 (Peek().kind == Token::Kind::kName && !IsName("and") && !IsName("or") &&
                  !IsName("if") && !IsName("else") && !IsName("is") && !IsName("in") &&
                  !IsName("not"))) {
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

}  // namespace dmoe::text::jinja
