// A small byte-level BPE tokenizer for the gateway's tests, shaped so that the
// fake router's output ((sum of prompt + i) % 1000) decodes to readable text:
//   ids 0..255     the bytes (id == byte value)
//   ids 256..999   "w<id>" ("w300"), except
//     500, 501     "你" split across two tokens: bytes E4 BD | A0 '!'
//     502, 503     "😀" split across two tokens: bytes F0 9F | 98 80
//   1000 "<s>" (BOS, special), 1001 "</s>" (EOS, special),
//   1002 "<|user|>", 1003 "<|assistant|>" (added, not special)
// tokenizer_config.json adds BOS and has a chat template:
//   <s>{system}\n<|user|>{user}<|assistant|>{assistant}</s>...<|assistant|>
// where a first message "raise" makes it raise_exception.
#ifndef DMOE_GATEWAY_TESTING_TOKENIZER_FIXTURE_H_
#define DMOE_GATEWAY_TESTING_TOKENIZER_FIXTURE_H_

#include <memory>
#include <string>

#include "nlohmann/json.hpp"
#include "text/tokenizer.h"

namespace dmoe::gateway::testing {

// GPT-2's byte-level string of `bytes`.
inline std::string ByteLevelString(const std::string& bytes) {
  auto printable = [](int b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
  };
  std::string out;
  for (unsigned char b : bytes) {
    int cp = b;
    if (!printable(b)) {
      int extra = 0;
      for (int x = 0; x < b; ++x) extra += printable(x) ? 0 : 1;
      cp = 256 + extra;
    }
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  return out;
}

inline const char* TestChatTemplate() {
  return "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ "
         "m['content'] }}"
         "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
         "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}"
         "{% if messages[0]['content'] == 'raise' %}{{ raise_exception('no raising') }}{% endif %}";
}

inline std::unique_ptr<text::Tokenizer> TestTokenizer() {
  using json = nlohmann::json;
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteLevelString(std::string(1, static_cast<char>(b)))] = b;
  for (int id = 256; id < 1000; ++id) {
    std::string bytes = "w" + std::to_string(id);
    if (id == 500) bytes = "\xE4\xBD";
    if (id == 501) bytes = "\xA0!";
    if (id == 502) bytes = "\xF0\x9F";
    if (id == 503) bytes = "\x98\x80";
    vocab[ByteLevelString(bytes)] = id;
  }
  auto added = [](int id, const char* content, bool special) {
    return json{{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", false}, {"special", special}};
  };
  const json tok = {
      {"version", "1.0"},
      {"added_tokens",
       json::array({added(1000, "<s>", true), added(1001, "</s>", true),
                    added(1002, "<|user|>", false), added(1003, "<|assistant|>", false)})},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}};
  const json config = {{"add_bos_token", true},
                       {"add_eos_token", false},
                       {"bos_token", "<s>"},
                       {"eos_token", "</s>"},
                       {"chat_template", TestChatTemplate()}};
  auto t = text::Tokenizer::FromJson(tok.dump(), config.dump());
  return t.ok() ? std::move(*t) : nullptr;
}

}  // namespace dmoe::gateway::testing

#endif  // DMOE_GATEWAY_TESTING_TOKENIZER_FIXTURE_H_
