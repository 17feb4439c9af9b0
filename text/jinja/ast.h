// Internal to dmoe_text (namespace dmoe::text::jinja): the chat template's
// syntax tree, not an API. Include only from text/chat_template.cc and
// text/jinja/.
//
// Contract: the parser (parser.h) builds these trees and the renderer
// (renderer.h) walks them; nothing else creates them. A tree owns its
// children (unique_ptr) and is immutable once parsed, so one tree may render
// on several threads at once. `pos` is the byte offset in the normalized
// source that error messages report as line and column (Lexer::Where).
#ifndef DMOE_TEXT_JINJA_AST_H_
#define DMOE_TEXT_JINJA_AST_H_

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "text/jinja/values.h"

namespace dmoe::text::jinja {

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
  std::string name;                         // kName, kAttr, kFilter, kTest, kBinary (operator)
  bool negated = false;                     // kTest: "is not"
  std::vector<std::unique_ptr<Expr>> args;  // operands / call args / elements
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
};

struct Node {
  enum class Kind { kBody, kText, kOutput, kIf, kFor, kSet, kSetBlock, kBreak, kContinue };
  Kind kind = Kind::kBody;
  size_t pos = 0;
  std::string text;                             // kText
  std::unique_ptr<Expr> expr;                   // kOutput, kFor (iterable), kSet (value)
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

}  // namespace dmoe::text::jinja

#endif  // DMOE_TEXT_JINJA_AST_H_
