// `dmoe tokenize`, `dmoe detokenize`, `dmoe chat-template`: the checkpoint's
// tokenizer (text/tokenizer.h) and chat template (text/chat_template.h) on
// stdin.
//
// Contract:
//   dmoe tokenize --model DIR [--add-special-tokens] < text
//       stdin is taken byte for byte (a trailing newline is text too) and must
//       be UTF-8; prints {"ids":[...]} and a newline.
//   dmoe detokenize --model DIR [--skip-special-tokens] < {"ids":[...]}
//       prints the text exactly (no newline added); ill-formed UTF-8 from byte
//       tokens becomes U+FFFD.
//   dmoe chat-template --model DIR <
//   {"messages":[...],"add_generation_prompt":true}
//       prints the rendered prompt exactly; other keys of the object (e.g.
//       "tools") are passed to the template too.
// DIR holds tokenizer.json (and tokenizer_config.json for BOS/EOS and the chat
// template). Exit codes: 0 ok; 2 usage; 1 input (unreadable tokenizer, invalid
// UTF-8, malformed JSON, unknown id, template error), with the reason on
// stderr.
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/args.h"
#include "nlohmann/json.hpp"
#include "text/chat_template.h"
#include "text/tokenizer.h"
#include "tools/commands.h"

namespace dmoe::tools {
namespace {

using ojson = nlohmann::ordered_json;

int Fail(const char* command, int code, absl::string_view message) {
  std::fprintf(stderr, "dmoe %s: %.*s\n", command, static_cast<int>(message.size()),
               message.data());
  return code;
}

std::string ReadStdin() {
  std::ios::sync_with_stdio(false);
  return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
}

void WriteStdout(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

// Parses the common flags; returns -1 to go on, else the exit code.
int ParseFlags(Args& args, int argc, char** argv) {
  if (absl::Status s = args.Parse(argc, argv, 2); !s.ok()) {
    std::fprintf(stderr, "dmoe %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (args.help_requested()) return 0;
  return -1;
}

}  // namespace

int RunTokenize(int argc, char** argv) {
  Args args("tokenize", "text on stdin -> {\"ids\":[...]} with the model's tokenizer");
  args.Flag("model", "DIR", "model directory with tokenizer.json", std::nullopt, true)
      .Flag("add-special-tokens", "", "add BOS/EOS as the tokenizer config says");
  if (int rc = ParseFlags(args, argc, argv); rc >= 0) return rc;
  auto tok = text::Tokenizer::Load(args.Str("model"));
  if (!tok.ok()) return Fail("tokenize", 1, tok.status().message());
  const std::string text = ReadStdin();
  auto ids = (*tok)->Encode(text, args.Bool("add-special-tokens"));
  if (!ids.ok()) return Fail("tokenize", 1, ids.status().message());
  std::string out = "{\"ids\":[";
  for (size_t k = 0; k < ids->size(); ++k) absl::StrAppend(&out, k ? "," : "", (*ids)[k]);
  out += "]}\n";
  WriteStdout(out);
  return 0;
}

int RunDetokenize(int argc, char** argv) {
  Args args("detokenize", "{\"ids\":[...]} on stdin -> text with the model's tokenizer");
  args.Flag("model", "DIR", "model directory with tokenizer.json", std::nullopt, true)
      .Flag("skip-special-tokens", "", "leave special tokens out of the text");
  if (int rc = ParseFlags(args, argc, argv); rc >= 0) return rc;
  auto tok = text::Tokenizer::Load(args.Str("model"));
  if (!tok.ok()) return Fail("detokenize", 1, tok.status().message());
  const ojson in = ojson::parse(ReadStdin(), nullptr, /*allow_exceptions=*/false);
  if (!in.is_object() || !in.contains("ids") || !in["ids"].is_array())
    return Fail("detokenize", 1, "stdin: expected {\"ids\": [integers]}");
  std::vector<int32_t> ids;
  for (const ojson& id : in["ids"]) {
    if (!id.is_number_integer()) return Fail("detokenize", 1, "stdin: \"ids\" must hold integers");
    const int64_t v = id.get<int64_t>();
    if (v < 0 || v > INT32_MAX)
      return Fail("detokenize", 1, absl::StrCat("token id ", v, " is out of range"));
    ids.push_back(static_cast<int32_t>(v));
  }
  auto text = (*tok)->Decode(ids, args.Bool("skip-special-tokens"));
  if (!text.ok()) return Fail("detokenize", 1, text.status().message());
  WriteStdout(*text);
  return 0;
}

int RunChatTemplate(int argc, char** argv) {
  Args args("chat-template",
            "{\"messages\":[...],\"add_generation_prompt\":true} on stdin -> "
            "the prompt the "
            "model's chat template renders");
  args.Flag("model", "DIR", "model directory with tokenizer_config.json", std::nullopt, true);
  if (int rc = ParseFlags(args, argc, argv); rc >= 0) return rc;
  auto tok = text::Tokenizer::Load(args.Str("model"));
  if (!tok.ok()) return Fail("chat-template", 1, tok.status().message());
  const ojson in = ojson::parse(ReadStdin(), nullptr, /*allow_exceptions=*/false);
  if (!in.is_object() || !in.contains("messages") || !in["messages"].is_array())
    return Fail("chat-template", 1,
                "stdin: expected {\"messages\": [...], "
                "\"add_generation_prompt\": bool}");
  const ojson& agp =
      in.contains("add_generation_prompt") ? in["add_generation_prompt"] : ojson(false);
  if (!agp.is_boolean())
    return Fail("chat-template", 1, "stdin: \"add_generation_prompt\" must be a boolean");
  ojson extra = ojson::object();
  for (auto it = in.begin(); it != in.end(); ++it)
    if (it.key() != "messages" && it.key() != "add_generation_prompt") extra[it.key()] = it.value();
  auto prompt = text::ApplyChatTemplate(**tok, in["messages"], agp.get<bool>(), extra);
  if (!prompt.ok()) return Fail("chat-template", 1, prompt.status().message());
  WriteStdout(*prompt);
  return 0;
}

}  // namespace dmoe::tools
