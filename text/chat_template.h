// Chat templates: the Jinja `chat_template` of tokenizer_config.json, rendered
// the way transformers' apply_chat_template renders it (Jinja2 with
// trim_blocks, lstrip_blocks, the loopcontrols extension, transformers'
// `tojson`).
//
// A Jinja subset, enough for the DeepSeek family (V2, V2.5, V3, R1, V3.1) and
// similar templates:
//  - tags: {{ }}, {% %}, {# #}, whitespace control (-, +); if/elif/else, for
//  (with
//    `else`, an `if` filter, tuple targets, `loop.*`), set (names, `ns.attr`,
//    block set), break/continue, generation.
//  - expressions: literals (strings with Python escapes, ints, floats, lists,
//    dicts, tuples), and/or/not, comparisons, `in`/`not in`, + - * / // % **,
//    ~, `a if c else b`, attributes, indexing with negative indices, slices,
//    tests (defined, undefined, none, string, number, integer, float, boolean,
//    true, false, mapping, sequence, iterable, odd, even, eq/equalto), filters
//    (length, count, trim, tojson, lower, upper, capitalize, title, string,
//    int, float, join, first, last, default/d, list, reverse, replace, items,
//    safe), globals (namespace, range, raise_exception, dict) and string/dict
//    methods (strip, lstrip, rstrip, split, startswith, endswith, lower, upper,
//    replace, title, items, keys, values, get).
//  - values print as Python does (None, True, ['a']); undefined prints as "".
//  - numbers: ints are int64 and floats double, with Python's arithmetic
//    (int op int is an int, a float operand makes a float). Where Python's
//    unbounded ints would leave int64 (a literal, + - * // **, unary minus,
//    the `int` filter of a huge float or of inf) and where Python raises
//    (division by zero, float ** overflow) it is an error naming the
//    operation: never a wrapped result, an exception or undefined behaviour.
//    A float literal beyond double's range (1e999) is a Parse error.
// Anything else (macros, include, call blocks, unknown filters, tests, methods)
// is an error naming the construct and its line and column, at Parse when it is
// a tag and at Render when it is a name only known then: never a different
// prompt.
//
// Thread safety: a parsed ChatTemplate is immutable; Render may run
// concurrently.
#ifndef DMOE_TEXT_CHAT_TEMPLATE_H_
#define DMOE_TEXT_CHAT_TEMPLATE_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace dmoe::text {

class Tokenizer;

class ChatTemplate {
 public:
  // INVALID_ARGUMENT "chat template line L col C: ..." for syntax errors and
  // unsupported tags.
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Parse(std::string_view source);
  ~ChatTemplate();

  // Renders with the variables of `context` (a JSON object; objects keep their
  // key order). INVALID_ARGUMENT naming line and column for evaluation errors
  // and unsupported names; raise_exception(msg) is INVALID_ARGUMENT with msg.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;

  struct Node;

 private:
  ChatTemplate() = default;
  std::unique_ptr<Node> root_;
};

// The prompt transformers' apply_chat_template(messages, tokenize=False,
// add_generation_prompt=...) renders with `tokenizer`'s template: the context
// is messages, add_generation_prompt, bos_token, eos_token, plus `extra` (e.g.
// tools). FAILED_PRECONDITION when the tokenizer has no chat template.
absl::StatusOr<std::string> ApplyChatTemplate(const Tokenizer& tokenizer,
                                              const nlohmann::ordered_json& messages,
                                              bool add_generation_prompt,
                                              const nlohmann::ordered_json& extra = {});

}  // namespace dmoe::text

#endif  // DMOE_TEXT_CHAT_TEMPLATE_H_
