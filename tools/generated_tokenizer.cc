#include "tools/generated_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstddef>
#include <map>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace dmoe::tools {
namespace {

using ojson = nlohmann::ordered_json;

// Written for this file: everyday English in short sentences, so that the
// frequent words, their pieces and the spaces before them become tokens.
constexpr std::string_view kCorpus =
    R"(The quick brown fox jumps over the lazy dog. The dog does not mind; it is asleep in the sun.
Once upon a time there was a small house at the edge of a wide green field. In the house lived an old woman, her son and their cat.
Every morning the woman opened the windows, made tea and looked at the weather. When it was warm she worked in the garden; when it was cold she read by the fire.
Her son was a baker. He got up before the sun, walked to the village and baked bread for everyone. People said his bread was the best in the country.
The cat did what cats do: it slept, it ate, and at night it went out to hunt. Nobody knew where it went, and nobody asked.
One day a letter came for the old woman. It was from her sister, who lived in a city by the sea. "Come and visit me this summer," the letter said. "The days are long and the water is warm."
The woman read the letter twice. She had not seen her sister for many years. She thought about the long journey, the train, the boat and the noise of the city.
"Should I go?" she asked her son that evening. "Of course you should," he answered. "I can look after the house and the cat. You will have a good time."
So she packed a bag with some clothes, a book, a warm coat and a little money, and in the first week of July she left.
The train was full of people going somewhere: students with their books, workers with their tools, families with children who could not sit still.
She watched the fields, the rivers and the towns go by. In the afternoon the train reached the coast, and she saw the sea for the first time in her life.
Her sister was waiting at the station. They held each other for a long time and then they both started talking at once, and laughed.
For three weeks they walked along the beach, ate fish and fruit, went to the market and sat in the shade of the trees in the park.
They talked about their parents, their friends, the school they went to and the things they had done and wanted to do.
When it was time to go home, the woman was sad but also happy. She had learned that it is never too late to see something new.
At home her son had kept everything in order. The garden was green, the bread was fresh and the cat was as lazy as ever.

How does a computer understand text? It does not read words the way people do. First the text is split into small pieces called tokens.
A token can be a whole word, a part of a word, a number or a sign like a comma or a question mark. Common words are usually one token each.
The model turns every token into a vector of numbers, and then it computes, layer by layer, which token is likely to come next.
Large language models have read a great deal of text. They learn grammar, facts and styles of writing from examples, not from rules.
A mixture of experts is a model in which only some parts, the experts, work on each token. A small network, the router, chooses them.
Because each token uses only a few experts, the model can be very large and still fast enough to answer questions in real time.
The experts can live on different machines. Then the tokens travel over the network to the servers that hold the experts they need.
Good systems measure where the time goes: in the math, in the memory, or in the messages between the machines.
When one server gets more work than the others, it becomes the bottleneck, so the work should be balanced across all of them.

Here are some simple facts. Water boils at one hundred degrees Celsius at sea level. There are seven days in a week and twelve months in a year.
The earth goes around the sun once a year and turns around itself once a day. The moon goes around the earth in about four weeks.
Light is faster than sound; that is why we see the lightning before we hear the thunder. Plants need light, water and air to grow.
Numbers: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 20, 25, 50, 100, 365, 1000, 2024. Two plus two is four, and ten times ten is one hundred.
Questions people often ask: What time is it? Where are you from? How are you today? What would you like to eat? Can you help me, please?
Answers they often hear: I'm fine, thank you. It's three o'clock. I'd like some coffee. We're from the north. They've already left. You'll see.
Please write a short story about a friendly robot who wants to learn how to cook dinner for its family.
Explain why the sky is blue in simple words. Give me three ideas for a birthday present. Translate this sentence into French.
Thank you very much for your help! You're welcome. Have a nice day, and see you next time.
)";

constexpr std::string_view kContractions[] = {"s", "t", "re", "ve", "m", "ll", "d"};

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
bool IsLetter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// 0: space, 1: letter, 2: digit, 3: other (ASCII classes of the GPT-2 regex;
// bytes >= 0x80 count as letters, enough for training on ASCII text).
int ClassOf(char c) {
  if (IsSpace(c)) return 0;
  if (IsLetter(c) || static_cast<unsigned char>(c) >= 0x80) return 1;
  if (IsDigit(c)) return 2;
  return 3;
}

// GPT-2's byte-to-unicode map (text/tokenizer.cc reads it back), as UTF-8.
std::array<std::string, 256> ByteLevelChars() {
  std::array<std::string, 256> out;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + extra++);
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {  // < 0x800: two bytes
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    out[b] = std::move(s);
  }
  return out;
}

// BPE training over the corpus's pieces: `target` tokens at most (bytes
// included). Tokens are indices into `bytes` (0..255 the bytes themselves);
// merges are pairs of indices, in the order learned.
struct Trained {
  std::vector<std::string> bytes;
  std::vector<std::pair<int32_t, int32_t>> merges;
};

Trained Train(int64_t target) {
  Trained t;
  t.bytes.reserve(target);
  for (int b = 0; b < 256; ++b) t.bytes.emplace_back(1, static_cast<char>(b));
  std::map<std::string, int64_t> counts;  // ordered: deterministic iteration
  for (std::string_view p : internal::PreTokenize(kCorpus)) counts[std::string(p)]++;
  struct Word {
    std::vector<int32_t> symbols;
    int64_t count;
  };
  std::vector<Word> words;
  for (const auto& [w, n] : counts) {
    Word word{{}, n};
    for (unsigned char c : w) word.symbols.push_back(c);
    words.push_back(std::move(word));
  }
  absl::flat_hash_map<std::string, int32_t> index;  // token bytes -> index
  for (int b = 0; b < 256; ++b) index[t.bytes[b]] = b;

  absl::flat_hash_map<uint64_t, int64_t> pairs;
  auto key = [](int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  };
  while (static_cast<int64_t>(t.bytes.size()) < target) {
    pairs.clear();
    for (const Word& w : words) {
      for (size_t i = 0; i + 1 < w.symbols.size(); ++i) {
        pairs[key(w.symbols[i], w.symbols[i + 1])] += w.count;
      }
    }
    // The most frequent pair; ties to the smaller key (first id, then second).
    uint64_t best = 0;
    int64_t best_count = 0;
    for (const auto& [k, n] : pairs) {
      if (n > best_count || (n == best_count && k < best)) {
        best = k;
        best_count = n;
      }
    }
    if (best_count == 0) break;  // every piece is one token
    const int32_t a = static_cast<int32_t>(best >> 32), b = static_cast<int32_t>(best);
    const std::string merged = t.bytes[a] + t.bytes[b];
    auto [it, inserted] = index.try_emplace(merged, static_cast<int32_t>(t.bytes.size()));
    // A string another merge already made stays one token (two merges make
    // it, as Hugging Face's trainer allows).
    if (inserted) t.bytes.push_back(merged);
    t.merges.emplace_back(a, b);
    const int32_t m = it->second;
    for (Word& w : words) {
      size_t out = 0;
      for (size_t i = 0; i < w.symbols.size(); ++i) {
        if (i + 1 < w.symbols.size() && w.symbols[i] == a && w.symbols[i + 1] == b) {
          w.symbols[out++] = m;
          ++i;
        } else {
          w.symbols[out++] = w.symbols[i];
        }
      }
      w.symbols.resize(out);
    }
  }
  return t;
}

// DeepSeek-V2-Chat's chat template (system text, "User: ", "Assistant: " and
// EOS after each answer).
constexpr char kChatTemplate[] =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt "
    "= false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + "
    "'\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% "
    "endif %}";

ojson AddedToken(int64_t id, std::string_view content) {
  ojson t;
  t["id"] = id;
  t["content"] = std::string(content);
  t["single_word"] = false;
  t["lstrip"] = false;
  t["rstrip"] = false;
  t["normalized"] = false;
  t["special"] = true;
  return t;
}

ojson ByteLevel(bool add_prefix_space) {
  ojson b;
  b["type"] = "ByteLevel";
  b["add_prefix_space"] = add_prefix_space;
  b["trim_offsets"] = true;
  b["use_regex"] = true;
  return b;
}

}  // namespace

namespace internal {

std::string_view TrainingCorpus() { return kCorpus; }

std::vector<std::string_view> PreTokenize(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    if (s[i] == '\'') {  // 's|'t|'re|'ve|'m|'ll|'d
      bool matched = false;
      for (std::string_view c : kContractions) {
        if (s.substr(i + 1, c.size()) == c) {
          out.push_back(s.substr(i, 1 + c.size()));
          i += 1 + c.size();
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
    size_t j = i;
    if (s[j] == ' ' && j + 1 < n && !IsSpace(s[j + 1])) ++j;
    if (!IsSpace(s[j])) {
      const int cls = ClassOf(s[j]);
      size_t k = j + 1;
      while (k < n && ClassOf(s[k]) == cls) ++k;
      out.push_back(s.substr(i, k - i));
      i = k;
      continue;
    }
    // `\s+(?!\S)` (a run before a word leaves its last space to the word),
    // then `\s+`.
    size_t k = i;
    while (k < n && IsSpace(s[k])) ++k;
    if (k < n && k - i > 1) --k;
    out.push_back(s.substr(i, k - i));
    i = k;
  }
  return out;
}

}  // namespace internal

absl::StatusOr<GeneratedTokenizer> GenerateTokenizer(const GeneratedTokenizerOptions& o) {
  if (o.vocab_size < 258) {
    return absl::InvalidArgumentError(
        absl::StrCat("generated tokenizer: vocab_size ", o.vocab_size,
                     " is too small for 256 byte tokens and 2 special tokens "
                     "(at least 258)"));
  }
  for (const auto& [name, id] : {std::pair{"bos", o.bos_id}, std::pair{"eos", o.eos_id}}) {
    if (id < 0 || id >= o.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("generated tokenizer: ", name, "_token_id ",
                                                     id, " is outside the vocabulary [0, ",
                                                     o.vocab_size, ")"));
    }
  }
  if (o.bos_id == o.eos_id) {
    return absl::InvalidArgumentError(
        absl::StrCat("generated tokenizer: bos_token_id and eos_token_id are both ", o.bos_id));
  }
  const Trained trained = Train(o.vocab_size - 2);

  // Ids: the special tokens where the caller wants them, the others in order
  // around them.
  std::vector<int64_t> id_of(trained.bytes.size());
  int64_t next = 0;
  for (size_t t = 0; t < trained.bytes.size(); ++t) {
    while (next == o.bos_id || next == o.eos_id) ++next;
    id_of[t] = next++;
  }
  const std::array<std::string, 256> chars = ByteLevelChars();
  auto byte_level = [&](const std::string& bytes) {
    std::string s;
    for (unsigned char c : bytes) s += chars[c];
    return s;
  };
  ojson vocab = ojson::object();
  for (size_t t = 0; t < trained.bytes.size(); ++t) vocab[byte_level(trained.bytes[t])] = id_of[t];
  ojson merges = ojson::array();
  for (const auto& [a, b] : trained.merges) {
    merges.push_back(absl::StrCat(byte_level(trained.bytes[a]), " ", byte_level(trained.bytes[b])));
  }

  const std::string bos(kGeneratedBosToken), eos(kGeneratedEosToken);
  ojson tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = ojson::array({AddedToken(o.bos_id, bos), AddedToken(o.eos_id, eos)});
  tok["normalizer"] = nullptr;
  tok["pre_tokenizer"] = ByteLevel(/*add_prefix_space=*/false);
  ojson post;
  post["type"] = "TemplateProcessing";
  auto special = [&](int type_id) {
    return ojson{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}};
  };
  auto sequence = [](const char* id, int type_id) {
    return ojson{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
  };
  post["single"] = ojson::array({special(0), sequence("A", 0)});
  post["pair"] = ojson::array({special(0), sequence("A", 0), special(1), sequence("B", 1)});
  post["special_tokens"][bos] = {
      {"id", bos}, {"ids", ojson::array({o.bos_id})}, {"tokens", ojson::array({bos})}};
  tok["post_processor"] = std::move(post);
  tok["decoder"] = ByteLevel(/*add_prefix_space=*/true);
  ojson model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = false;
  model["vocab"] = std::move(vocab);
  model["merges"] = std::move(merges);
  tok["model"] = std::move(model);

  ojson cfg;
  cfg["add_bos_token"] = true;
  cfg["add_eos_token"] = false;
  cfg["bos_token"] = bos;
  cfg["eos_token"] = eos;
  cfg["pad_token"] = eos;
  cfg["clean_up_tokenization_spaces"] = false;
  cfg["legacy"] = true;
  cfg["model_max_length"] = o.model_max_length;
  cfg["tokenizer_class"] = "LlamaTokenizerFast";
  cfg["chat_template"] = kChatTemplate;

  GeneratedTokenizer out;
  out.tokenizer_json = tok.dump(2) + "\n";
  out.tokenizer_config_json = cfg.dump(2) + "\n";
  out.size = std::max<int64_t>({next, o.bos_id + 1, o.eos_id + 1});
  out.merges = static_cast<int64_t>(trained.merges.size());
  return out;
}

}  // namespace dmoe::tools
