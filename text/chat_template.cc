#include "text/chat_template.h"

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "core/status.h"
#include "text/jinja/ast.h"
#include "text/jinja/lexer.h"
#include "text/jinja/parser.h"
#include "text/jinja/renderer.h"
#include "text/tokenizer.h"

// The Jinja subset lives in text/jinja/ (namespace dmoe::text::jinja, internal
// to dmoe_text): values, lexer, ast, parser, renderer. This file is the public
// API over them.

namespace dmoe::text {

// A parsed template: a jinja::Node body whose `text` holds the normalized
// source (the lexer's positions refer to it) and whose child 0 is the tree.
struct ChatTemplate::Node : jinja::Node {};

namespace {

using ojson = nlohmann::ordered_json;
using jinja::Flow;
using jinja::Lexer;
using jinja::Parser;
using jinja::Renderer;
using jinja::Token;

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

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Parse(std::string_view source) {
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

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& context) const {
  if (!context.is_object())
    return absl::InvalidArgumentError("chat template context must be a JSON object");
  Lexer lexer(root_->text);
  Renderer r(lexer, context);
  std::string out;
  DMOE_ASSIGN_OR_RETURN(Flow f, r.Exec(*root_->children[0], &out));
  (void)f;
  return out;
}

absl::StatusOr<std::string> ApplyChatTemplate(const Tokenizer& tokenizer,
                                              const nlohmann::ordered_json& messages,
                                              bool add_generation_prompt,
                                              const nlohmann::ordered_json& extra) {
  if (tokenizer.chat_template().empty())
    return absl::FailedPreconditionError(
        "the tokenizer has no chat_template (tokenizer_config.json)");
  DMOE_ASSIGN_OR_RETURN(auto tmpl, ChatTemplate::Parse(tokenizer.chat_template()));
  ojson context = ojson::object();
  context["messages"] = messages;
  context["add_generation_prompt"] = add_generation_prompt;
  context["bos_token"] = tokenizer.bos_token();
  context["eos_token"] = tokenizer.eos_token();
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it) context[it.key()] = it.value();
  return tmpl->Render(context);
}

}  // namespace dmoe::text
