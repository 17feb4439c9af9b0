#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <queue>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "core/status.h"
#include "nlohmann/json.hpp"

namespace dmoe::text {
namespace {

using json = nlohmann::json;

// Debian's Abseil is built with its own string_view type, not std::string_view.
absl::string_view AV(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status Invalid(absl::string_view file, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": ", msg));
}

// ---------------------------------------------------------------------------
// GPT-2 byte-level alphabet: every byte has a printable code point.

struct ByteAlphabet {
  std::array<char32_t, 256> byte_to_char;
  std::array<int16_t, 324> char_to_byte;  // -1: not a byte-level character
  ByteAlphabet() {
    char_to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      byte_to_char[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
      char_to_byte[byte_to_char[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& Alphabet() {
  static const ByteAlphabet* a = new ByteAlphabet();
  return *a;
}

// Decodes one code point of valid UTF-8 at s[*i].
char32_t NextCodePoint(std::string_view s, size_t* i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data()) + *i;
  if (p[0] < 0x80) {
    *i += 1;
    return p[0];
  }
  if (p[0] < 0xE0) {
    *i += 2;
    return ((p[0] & 0x1F) << 6) | (p[1] & 0x3F);
  }
  if (p[0] < 0xF0) {
    *i += 3;
    return ((p[0] & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  }
  *i += 4;
  return ((p[0] & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F);
}

// The bytes a byte-level token string stands for, or nullopt when it has a
// character outside the alphabet (such a token can only be decoded, as its
// UTF-8).
std::optional<std::string> ByteLevelToBytes(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  size_t i = 0;
  while (i < token.size()) {
    const char32_t c = NextCodePoint(token, &i);
    if (c >= Alphabet().char_to_byte.size() || Alphabet().char_to_byte[c] < 0) return std::nullopt;
    out.push_back(static_cast<char>(Alphabet().char_to_byte[c]));
  }
  return out;
}

// Oniguruma's \s under UTF-8: U+0009-U+000D, U+0085 and the Z categories.
constexpr char kOnigSpaceSet[] =
    "\\x{9}-\\x{d}\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}"
    "\\x{2029}"
    "\\x{202f}\\x{205f}\\x{3000}";

// Rewrites an Oniguruma pattern for PCRE2: \s and \S become Oniguruma's set
// (outside classes as a class, inside a class \s as its ranges). The rest of
// the syntax HF patterns use (\p{..}, classes, (?!..), (?i:..), {m,n}) means
// the same.
absl::StatusOr<std::string> OnigToPcre2(std::string_view pattern) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') {
        absl::StrAppend(&out, in_class ? "" : "[", kOnigSpaceSet, in_class ? "" : "]");
      } else if (e == 'S') {
        if (in_class) {
          return absl::InvalidArgumentError(
              absl::StrCat("\\S inside a character class is not supported in /", AV(pattern), "/"));
        }
        absl::StrAppend(&out, "[^", kOnigSpaceSet, "]");
      } else {
        out.push_back(c);
        out.push_back(e);
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out.push_back(pattern[++i]);
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const size_t end = pattern.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(pattern.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

// ---------------------------------------------------------------------------
// PCRE2: compiled once, matched with per-thread match data and JIT stack.

struct Pcre2Scratch {
  pcre2_match_data* data = pcre2_match_data_create(8, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
  Pcre2Scratch() {
    pcre2_jit_stack_assign(context, nullptr, stack);
    // The pre-tokenizer patterns are linear; PCRE2's default match limit (10M)
    // refuses a long whitespace run that Hugging Face tokenizes fine.
    pcre2_set_match_limit(context, 0xFFFFFFFFu);
    pcre2_set_heap_limit(context,
                         1u << 20);  // KiB, the interpreter (no JIT) only
  }
  ~Pcre2Scratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

Pcre2Scratch& Scratch() {
  thread_local Pcre2Scratch scratch;
  return scratch;
}

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern, bool literal) {
    std::string translated(pattern);
    if (!literal) {
      DMOE_ASSIGN_OR_RETURN(translated, OnigToPcre2(pattern));
    }
    int err = 0;
    PCRE2_SIZE offset = 0;
    const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()),
                                     translated.size(), options, &err, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return absl::InvalidArgumentError(absl::StrFormat("regex /%s/ at offset %d: %s", pattern,
                                                        offset, reinterpret_cast<char*>(msg)));
    }
    auto r = std::unique_ptr<Regex>(new Regex(code));
    r->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return r;
  }
  ~Regex() { pcre2_code_free(code_); }

  // Calls on_match(start, end) for the non-overlapping matches in s, left to
  // right; after an empty match the search resumes one character later.
  absl::Status ForEachMatch(std::string_view s,
                            const std::function<void(size_t, size_t)>& on_match) const {
    Pcre2Scratch& scratch = Scratch();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t start = 0;
    while (start <= s.size()) {
      const int rc =
          jit_ ? pcre2_jit_match(code_, subject, s.size(), start, 0, scratch.data, scratch.context)
               : pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, scratch.data,
                             scratch.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        return absl::ResourceExhaustedError(absl::StrFormat("regex match failed at byte %d: %s",
                                                            start, reinterpret_cast<char*>(msg)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.data);
      const size_t b = ov[0], e = ov[1];
      on_match(b, e);
      if (e > b) {
        start = e;
      } else {
        if (b >= s.size()) break;
        size_t next = b;
        NextCodePoint(s, &next);
        start = next;
      }
    }
    return absl::OkStatus();
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
  bool jit_ = false;
};

// ---------------------------------------------------------------------------
// Pre-tokenization.

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevelPrefix } kind = Kind::kSplit;
  std::unique_ptr<Regex> regex;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

struct Span {
  size_t begin, end;
  bool match;
};

// HF tokenizers' SplitDelimiterBehavior, ported: `matches` covers the piece.
void ApplyBehavior(SplitBehavior behavior, std::vector<Span>& m, std::vector<Span>* out) {
  out->clear();
  switch (behavior) {
    case SplitBehavior::kIsolated:
      *out = m;
      return;
    case SplitBehavior::kRemoved:
      for (const Span& s : m)
        if (!s.match) out->push_back(s);
      return;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous = false;
      for (const Span& s : m) {
        if (s.match && !previous && !out->empty()) {
          out->back().end = s.end;
        } else {
          out->push_back(s);
        }
        previous = s.match;
      }
      return;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous = false;
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        if (it->match && !previous && !out->empty()) {
          out->back().begin = it->begin;
        } else {
          out->push_back(*it);
        }
        previous = it->match;
      }
      std::reverse(out->begin(), out->end());
      return;
    }
    case SplitBehavior::kContiguous: {
      bool previous = false;
      for (const Span& s : m) {
        if (s.match == previous && !out->empty()) {
          out->back().end = s.end;
        } else {
          out->push_back({s.begin, s.end, false});
        }
        previous = s.match;
      }
      return;
    }
  }
}

// The BPE cache: sharded so that concurrent encoders rarely share a lock; a
// shard is cleared when full (words repeat, so it refills with the frequent
// ones).
class WordCache {
 public:
  bool Get(std::string_view word, std::vector<int32_t>* out) const {
    const Shard& s = shards_[ShardOf(word)];
    absl::MutexLock lock(&s.mu);
    auto it = s.map.find(AV(word));
    if (it == s.map.end()) return false;
    out->insert(out->end(), it->second.begin(), it->second.end());
    return true;
  }
  void Put(std::string_view word, std::span<const int32_t> ids) const {
    Shard& s = shards_[ShardOf(word)];
    absl::MutexLock lock(&s.mu);
    if (s.map.size() >= kShardCapacity) s.map.clear();
    s.map.try_emplace(std::string(word), ids.begin(), ids.end());
  }
  static constexpr size_t kMaxWordBytes = 256;

 private:
  static constexpr size_t kShards = 16;
  static constexpr size_t kShardCapacity = 4096;
  struct Shard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> map ABSL_GUARDED_BY(mu);
  };
  static size_t ShardOf(std::string_view w) { return absl::Hash<std::string_view>()(w) % kShards; }
  mutable std::array<Shard, kShards> shards_;
};

struct Merge {
  int32_t rank;
  int32_t merged;
};

constexpr uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// Reads the content of an AddedToken-or-string value of tokenizer_config.json.
std::string TokenContent(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return "";
}

// Trie over added-token contents for leftmost-longest matching.
class TokenTrie {
 public:
  void Add(std::string_view s, int index) {
    int node = 0;
    for (unsigned char c : s) {
      auto it = nodes_[node].next.find(c);
      if (it == nodes_[node].next.end()) {
        nodes_.push_back({});
        it = nodes_[node].next.emplace(c, static_cast<int>(nodes_.size()) - 1).first;
      }
      node = it->second;
    }
    nodes_[node].token = index;
    first_[static_cast<unsigned char>(s[0])] = true;
  }
  bool empty() const { return nodes_.size() == 1; }
  // The longest token starting at s[pos]: its index and length, or -1.
  int LongestAt(std::string_view s, size_t pos, size_t* len) const {
    if (!first_[static_cast<unsigned char>(s[pos])]) return -1;
    int node = 0, best = -1;
    for (size_t i = pos; i < s.size(); ++i) {
      auto it = nodes_[node].next.find(static_cast<unsigned char>(s[i]));
      if (it == nodes_[node].next.end()) break;
      node = it->second;
      if (nodes_[node].token >= 0) {
        best = nodes_[node].token;
        *len = i + 1 - pos;
      }
    }
    return best;
  }

 private:
  struct Node {
    absl::flat_hash_map<unsigned char, int> next;
    int token = -1;
  };
  std::vector<Node> nodes_{1};
  std::array<bool, 256> first_{};
};

bool IsWordChar(std::string_view s, size_t pos, bool before) {
  // The character just before `pos` (before) or at `pos`; ASCII alphanumerics
  // and any non-ASCII letter count (HF: char::is_alphanumeric).
  if (before) {
    if (pos == 0) return false;
    size_t i = pos - 1;
    while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
    const unsigned char c = s[i];
    return c >= 0x80 || std::isalnum(c);
  }
  if (pos >= s.size()) return false;
  const unsigned char c = s[pos];
  return c >= 0x80 || std::isalnum(c);
}

bool IsSpaceAt(std::string_view s, size_t pos, bool before) {
  // ASCII whitespace only (lstrip/rstrip of DeepSeek-family tokens).
  const size_t i = before ? pos - 1 : pos;
  if (before ? pos == 0 : pos >= s.size()) return false;
  const char c = s[i];
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

}  // namespace

// ---------------------------------------------------------------------------

struct Tokenizer::Impl {
  // Const after construction.
  std::vector<std::string> id_bytes;  // decoded bytes per id
  std::vector<uint8_t> id_kind;       // 0: none, 1: model token, 2: added, 3: special added
  absl::flat_hash_map<std::string, int32_t> token_to_id;  // as written in tokenizer.json
  absl::flat_hash_map<std::string, int32_t> bytes_to_id;  // model tokens by their bytes
  std::array<int32_t, 256> byte_id;                       // single-byte tokens (-1: none)
  absl::flat_hash_map<uint64_t, Merge> merges;
  bool ignore_merges = false;
  // Every merge ranks after every merge that makes one of its parts (true for
  // merges learned in order): then long words can merge rank by rank.
  bool ranks_increase = false;
  std::vector<PreTokenizerStep> steps;
  bool has_byte_level = false;
  std::vector<AddedTokenInfo> added;
  TokenTrie plain_trie;                         // non-normalized added tokens
  TokenTrie normalized_trie;                    // normalized added tokens
  std::vector<int32_t> prefix_ids, suffix_ids;  // added with add_special_tokens
  std::string bos_token, eos_token, chat_template;
  std::optional<int32_t> bos_id, eos_id;
  WordCache cache;

  absl::Status LoadTokenizerJson(const json& j);
  absl::Status LoadPreTokenizer(const json& p);
  absl::Status LoadConfig(const json& c, const json& tokenizer_json);
  absl::Status EncodeText(std::string_view text, std::vector<int32_t>* out) const;
  absl::Status SplitAdded(const TokenTrie& trie, std::string_view text,
                          const std::function<absl::Status(std::string_view)>& on_text,
                          std::vector<int32_t>* out) const;
  absl::Status Bpe(std::string_view word, std::vector<int32_t>* out) const;
  struct Symbol {
    int32_t id, prev, next;
  };
  void MergeWithHeap(std::vector<Symbol>& sym) const;
  void MergeByRank(std::vector<Symbol>& sym) const;
};

namespace {
constexpr char kTokFile[] = "tokenizer.json";
constexpr char kCfgFile[] = "tokenizer_config.json";
}  // namespace

absl::Status Tokenizer::Impl::LoadPreTokenizer(const json& p) {
  if (p.is_null()) return absl::OkStatus();
  const std::string type = p.value("type", "");
  if (type == "Sequence") {
    if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array())
      return Invalid(kTokFile, "pre_tokenizer Sequence without a \"pretokenizers\" array");
    for (const json& q : p["pretokenizers"]) DMOE_RETURN_IF_ERROR(LoadPreTokenizer(q));
    return absl::OkStatus();
  }
  PreTokenizerStep step;
  if (type == "Split") {
    const json& pat = p.value("pattern", json());
    std::string pattern;
    bool literal;
    if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string()) {
      pattern = pat["Regex"].get<std::string>();
      literal = false;
    } else if (pat.is_object() && pat.contains("String") && pat["String"].is_string()) {
      pattern = pat["String"].get<std::string>();
      literal = true;
    } else {
      return Invalid(kTokFile,
                     "Split pre_tokenizer: \"pattern\" must be {\"Regex\"} or "
                     "{\"String\"}");
    }
    auto regex = Regex::Compile(pattern, literal);
    if (!regex.ok())
      return Invalid(kTokFile, absl::StrCat("Split pre_tokenizer: ", regex.status().message()));
    step.regex = std::move(*regex);
    static const std::pair<std::string_view, SplitBehavior> kBehaviors[] = {
        {"Removed", SplitBehavior::kRemoved},
        {"Isolated", SplitBehavior::kIsolated},
        {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
        {"MergedWithNext", SplitBehavior::kMergedWithNext},
        {"Contiguous", SplitBehavior::kContiguous}};
    const std::string behavior = p.value("behavior", "");
    bool found = false;
    for (const auto& [name, b] : kBehaviors) {
      if (behavior == name) {
        step.behavior = b;
        found = true;
      }
    }
    if (!found)
      return Invalid(kTokFile,
                     absl::StrCat("Split pre_tokenizer: unknown behavior '", behavior, "'"));
    step.invert = p.value("invert", false);
    steps.push_back(std::move(step));
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    if (p.value("add_prefix_space", false)) {
      PreTokenizerStep prefix;
      prefix.kind = PreTokenizerStep::Kind::kByteLevelPrefix;
      steps.push_back(std::move(prefix));
    }
    if (p.value("use_regex", true)) {
      DMOE_ASSIGN_OR_RETURN(
          step.regex,
          Regex::Compile(
              R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)",
              false));
      steps.push_back(std::move(step));
    }
    has_byte_level = true;
    return absl::OkStatus();
  }
  if (type == "Digits") {
    const bool individual = p.value("individual_digits", false);
    DMOE_ASSIGN_OR_RETURN(step.regex, Regex::Compile("\\p{N}", false));
    step.behavior = individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous;
    steps.push_back(std::move(step));
    return absl::OkStatus();
  }
  return Invalid(kTokFile, absl::StrCat("pre_tokenizer type '", type,
                                        "' is not supported (Sequence, Split, ByteLevel, Digits)"));
}

absl::Status Tokenizer::Impl::LoadTokenizerJson(const json& j) {
  if (!j.is_object()) return Invalid(kTokFile, "not a JSON object");
  // Normalizer: none or an empty Sequence.
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    const json& n = j["normalizer"];
    const bool empty_sequence = n.value("type", "") == "Sequence" && n.contains("normalizers") &&
                                n["normalizers"].is_array() && n["normalizers"].empty();
    if (!empty_sequence) {
      return Invalid(kTokFile, absl::StrCat("normalizer ", n.dump().substr(0, 80),
                                            " is not supported (only none or an empty Sequence)"));
    }
  }
  const json& model = j.value("model", json());
  if (!model.is_object() || model.value("type", "BPE") != "BPE")
    return Invalid(kTokFile, "model: only type \"BPE\" is supported");
  if (!model.contains("vocab") || !model["vocab"].is_object())
    return Invalid(kTokFile, "model.vocab: missing or not an object");
  if (!model.value("dropout", json()).is_null() && model["dropout"].is_number() &&
      model["dropout"].get<double>() != 0.0)
    return Invalid(kTokFile, "model.dropout: BPE dropout is not supported");
  ignore_merges = model.value("ignore_merges", false);

  DMOE_RETURN_IF_ERROR(LoadPreTokenizer(j.value("pre_tokenizer", json())));
  if (!has_byte_level)
    return Invalid(kTokFile,
                   "pre_tokenizer: only byte-level BPE (with a ByteLevel "
                   "pre-tokenizer) is supported");
  const json& decoder = j.value("decoder", json());
  if (!decoder.is_null() && decoder.value("type", "") != "ByteLevel")
    return Invalid(kTokFile, absl::StrCat("decoder type '", decoder.value("type", ""),
                                          "' is not supported (ByteLevel)"));

  // Vocabulary.
  int32_t max_id = -1;
  std::vector<std::pair<std::string, int32_t>> vocab;
  vocab.reserve(model["vocab"].size());
  for (const auto& [token, idv] : model["vocab"].items()) {
    if (!idv.is_number_integer() || idv.get<int64_t>() < 0 || idv.get<int64_t>() >= (1 << 30))
      return Invalid(kTokFile, absl::StrCat("model.vocab[\"", token,
                                            "\"]: id must be an integer in [0, 2^30)"));
    vocab.emplace_back(token, idv.get<int32_t>());
    max_id = std::max(max_id, idv.get<int32_t>());
  }
  const json& added_json = j.value("added_tokens", json::array());
  for (const json& a : added_json) {
    if (!a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
        !a["content"].is_string() || a["content"].get<std::string>().empty())
      return Invalid(kTokFile,
                     "added_tokens: every entry needs an integer id and a "
                     "non-empty content");
    max_id = std::max(max_id, a["id"].get<int32_t>());
  }
  id_bytes.assign(max_id + 1, "");
  id_kind.assign(max_id + 1, 0);
  byte_id.fill(-1);
  token_to_id.reserve(vocab.size());
  bytes_to_id.reserve(vocab.size());
  for (auto& [token, id] : vocab) {
    std::optional<std::string> bytes = ByteLevelToBytes(token);
    id_bytes[id] = bytes ? *bytes : token;
    id_kind[id] = 1;
    if (bytes) {
      if (bytes->size() == 1) byte_id[static_cast<unsigned char>((*bytes)[0])] = id;
      bytes_to_id.emplace(std::move(*bytes), id);
    }
    token_to_id.emplace(std::move(token), id);
  }

  // Merges: "a b" strings or ["a", "b"] pairs; rank = position.
  const json& merges_json = model.value("merges", json::array());
  merges.reserve(merges_json.size());
  int32_t rank = 0;
  for (const json& m : merges_json) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ', 1);
      if (sp == std::string::npos)
        return Invalid(kTokFile,
                       absl::StrCat("model.merges[", rank, "]: '", s, "' is not \"a b\""));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return Invalid(kTokFile, absl::StrCat("model.merges[", rank, "]: not \"a b\" or [a, b]"));
    }
    auto ia = token_to_id.find(a), ib = token_to_id.find(b), im = token_to_id.find(a + b);
    if (ia == token_to_id.end() || ib == token_to_id.end() || im == token_to_id.end())
      return Invalid(kTokFile, absl::StrCat("model.merges[", rank, "]: '", a, " ", b,
                                            "' uses a token that is not in the vocabulary"));
    merges.try_emplace(PairKey(ia->second, ib->second), Merge{rank, im->second});
    ++rank;
  }
  {
    std::vector<int32_t> made_at(id_bytes.size(),
                                 -1);  // latest rank making each token
    for (const auto& [pair, m] : merges) made_at[m.merged] = std::max(made_at[m.merged], m.rank);
    ranks_increase = true;
    for (const auto& [pair, m] : merges) {
      const int32_t a = static_cast<int32_t>(pair >> 32), b = static_cast<int32_t>(pair);
      if (made_at[a] >= m.rank || made_at[b] >= m.rank) ranks_increase = false;
    }
  }

  // Added tokens.
  for (const json& a : added_json) {
    AddedTokenInfo t;
    t.id = a["id"].get<int32_t>();
    t.content = a["content"].get<std::string>();
    t.special = a.value("special", false);
    t.single_word = a.value("single_word", false);
    t.lstrip = a.value("lstrip", false);
    t.rstrip = a.value("rstrip", false);
    t.normalized = a.value("normalized", !t.special);
    DMOE_RETURN_IF_ERROR(ValidateUtf8(t.content, absl::StrCat(kTokFile, ": added token ", t.id)));
    id_bytes[t.id] = t.content;
    id_kind[t.id] = t.special ? 3 : 2;
    token_to_id[t.content] = t.id;
    (t.normalized ? normalized_trie : plain_trie).Add(t.content, static_cast<int>(added.size()));
    added.push_back(std::move(t));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadConfig(const json& c, const json& tokenizer_json) {
  auto id_of = [&](const std::string& s) -> std::optional<int32_t> {
    auto it = token_to_id.find(s);
    if (it == token_to_id.end()) return std::nullopt;
    return it->second;
  };
  if (c.is_object()) {
    bos_token = TokenContent(c.value("bos_token", json()));
    eos_token = TokenContent(c.value("eos_token", json()));
    if (!bos_token.empty()) {
      bos_id = id_of(bos_token);
      if (!bos_id)
        return Invalid(kCfgFile, absl::StrCat("bos_token '", bos_token, "' is not a token"));
    }
    if (!eos_token.empty()) {
      eos_id = id_of(eos_token);
      if (!eos_id)
        return Invalid(kCfgFile, absl::StrCat("eos_token '", eos_token, "' is not a token"));
    }
    const json& tmpl = c.value("chat_template", json());
    if (tmpl.is_string()) {
      chat_template = tmpl.get<std::string>();
    } else if (tmpl.is_array()) {
      for (const json& t : tmpl) {
        if (t.is_object() && t.value("name", "") == "default" && t.contains("template") &&
            t["template"].is_string())
          chat_template = t["template"].get<std::string>();
      }
    }
    if (c.contains("add_bos_token") || c.contains("add_eos_token")) {
      // transformers' LlamaTokenizerFast rebuilds the post-processor from
      // these.
      if (c.value("add_bos_token", false) && bos_id) prefix_ids.push_back(*bos_id);
      if (c.value("add_eos_token", false) && eos_id) suffix_ids.push_back(*eos_id);
      return absl::OkStatus();
    }
  }
  // TemplateProcessing (alone or in a Sequence): its "single" template.
  std::function<absl::Status(const json&)> template_of = [&](const json& p) -> absl::Status {
    if (!p.is_object()) return absl::OkStatus();
    if (p.value("type", "") == "Sequence" && p.contains("processors")) {
      for (const json& q : p["processors"]) DMOE_RETURN_IF_ERROR(template_of(q));
      return absl::OkStatus();
    }
    if (p.value("type", "") != "TemplateProcessing") return absl::OkStatus();
    bool seen_sequence = false;
    for (const json& piece : p.value("single", json::array())) {
      if (piece.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      const std::string name = piece.value("SpecialToken", json::object()).value("id", "");
      const json& st = p.value("special_tokens", json::object()).value(name, json());
      if (!st.is_object() || !st.contains("ids") || !st["ids"].is_array())
        return Invalid(kTokFile,
                       absl::StrCat("post_processor: special token '", name, "' has no ids"));
      for (const json& id : st["ids"])
        (seen_sequence ? suffix_ids : prefix_ids).push_back(id.get<int32_t>());
    }
    return absl::OkStatus();
  };
  return template_of(tokenizer_json.value("post_processor", json()));
}

// A min-heap of candidate merges ordered by (rank, position), as Hugging Face's
// BPE; stale candidates are recognised by the ids.
void Tokenizer::Impl::MergeWithHeap(std::vector<Symbol>& sym) const {
  struct Candidate {
    int32_t rank, pos, left, right, merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto consider = [&](int32_t pos) {
    const int32_t next = sym[pos].next;
    if (next < 0) return;
    auto it = merges.find(PairKey(sym[pos].id, sym[next].id));
    if (it != merges.end())
      heap.push({it->second.rank, pos, sym[pos].id, sym[next].id, it->second.merged});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) consider(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = sym[c.pos];
    if (left.id != c.left || left.next < 0 || sym[left.next].id != c.right) continue;
    Symbol& right = sym[left.next];
    left.id = c.merged;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = c.pos;
    right.id = -1;
    if (left.prev >= 0) consider(left.prev);
    consider(c.pos);
  }
}

// The same merges in the same order for long words, with less memory traffic:
// when ranks increase (a merge's parts are made by lower ranks), a merge only
// creates candidates of higher rank, so the candidates of the lowest pending
// rank are final and can be applied left to right from one sorted bucket.
void Tokenizer::Impl::MergeByRank(std::vector<Symbol>& sym) const {
  absl::flat_hash_map<int32_t, std::vector<int32_t>> buckets;  // rank -> positions
  std::priority_queue<int32_t, std::vector<int32_t>, std::greater<int32_t>> ranks;
  auto consider = [&](int32_t pos) {
    const int32_t next = sym[pos].next;
    if (next < 0) return;
    auto it = merges.find(PairKey(sym[pos].id, sym[next].id));
    if (it == merges.end()) return;
    auto [bucket, inserted] = buckets.try_emplace(it->second.rank);
    if (inserted) ranks.push(it->second.rank);
    bucket->second.push_back(pos);
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) consider(i);
  std::vector<int32_t> positions;
  while (!ranks.empty()) {
    const int32_t rank = ranks.top();
    ranks.pop();
    auto node = buckets.find(rank);
    positions.swap(node->second);
    buckets.erase(node);
    std::sort(positions.begin(), positions.end());
    for (int32_t pos : positions) {
      Symbol& left = sym[pos];
      if (left.id < 0 || left.next < 0) continue;
      auto it = merges.find(PairKey(left.id, sym[left.next].id));
      if (it == merges.end() || it->second.rank != rank) continue;
      Symbol& right = sym[left.next];
      left.id = it->second.merged;
      left.next = right.next;
      if (right.next >= 0) sym[right.next].prev = pos;
      right.id = -1;
      if (left.prev >= 0) consider(left.prev);
      consider(pos);
    }
    positions.clear();
  }
}

absl::Status Tokenizer::Impl::Bpe(std::string_view word, std::vector<int32_t>* out) const {
  if (word.size() == 1) {
    const int32_t id = byte_id[static_cast<unsigned char>(word[0])];
    if (id < 0)
      return absl::InvalidArgumentError(
          absl::StrFormat("no token for byte 0x%02x", word[0] & 0xFF));
    out->push_back(id);
    return absl::OkStatus();
  }
  if (ignore_merges) {
    auto it = bytes_to_id.find(AV(word));
    if (it != bytes_to_id.end()) {
      out->push_back(it->second);
      return absl::OkStatus();
    }
  }
  const bool cacheable = word.size() <= WordCache::kMaxWordBytes;
  if (cacheable && cache.Get(word, out)) return absl::OkStatus();

  // Symbols in a linked list over the word's bytes.
  const int32_t n = static_cast<int32_t>(word.size());
  std::vector<Symbol> sym(n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t id = byte_id[static_cast<unsigned char>(word[i])];
    if (id < 0)
      return absl::InvalidArgumentError(
          absl::StrFormat("no token for byte 0x%02x", word[i] & 0xFF));
    sym[i] = {id, i - 1, i + 1 < n ? i + 1 : -1};
  }
  if (ranks_increase && n > static_cast<int32_t>(WordCache::kMaxWordBytes)) {
    MergeByRank(sym);
  } else {
    MergeWithHeap(sym);
  }
  const size_t first = out->size();
  for (int32_t i = 0; i >= 0; i = sym[i].next) out->push_back(sym[i].id);
  if (cacheable)
    cache.Put(word, std::span<const int32_t>(out->data() + first, out->size() - first));
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::EncodeText(std::string_view text, std::vector<int32_t>* out) const {
  if (text.empty()) return absl::OkStatus();
  // Pieces are views into `text` or into `owned` (prefix spaces).
  std::deque<std::string> owned;
  std::vector<std::string_view> pieces{text}, next;
  std::vector<Span> matches, behaved;
  for (const PreTokenizerStep& step : steps) {
    next.clear();
    if (step.kind == PreTokenizerStep::Kind::kByteLevelPrefix) {
      for (std::string_view p : pieces) {
        if (!p.empty() && p[0] != ' ') {
          owned.push_back(absl::StrCat(" ", AV(p)));
          next.push_back(owned.back());
        } else {
          next.push_back(p);
        }
      }
      pieces.swap(next);
      continue;
    }
    for (std::string_view p : pieces) {
      matches.clear();
      size_t prev = 0;
      DMOE_RETURN_IF_ERROR(step.regex->ForEachMatch(p, [&](size_t b, size_t e) {
        if (prev != b) matches.push_back({prev, b, step.invert});
        matches.push_back({b, e, !step.invert});
        prev = e;
      }));
      if (prev != p.size()) matches.push_back({prev, p.size(), step.invert});
      ApplyBehavior(step.behavior, matches, &behaved);
      for (const Span& s : behaved)
        if (s.end > s.begin) next.push_back(p.substr(s.begin, s.end - s.begin));
    }
    pieces.swap(next);
  }
  for (std::string_view p : pieces) DMOE_RETURN_IF_ERROR(Bpe(p, out));
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::SplitAdded(
    const TokenTrie& trie, std::string_view text,
    const std::function<absl::Status(std::string_view)>& on_text, std::vector<int32_t>* out) const {
  if (trie.empty()) return on_text(text);
  size_t emitted = 0;  // text[emitted, ...) not yet handed on
  size_t pos = 0;
  while (pos < text.size()) {
    size_t len = 0;
    const int index = trie.LongestAt(text, pos, &len);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedTokenInfo& t = added[index];
    if (t.single_word && (IsWordChar(text, pos, true) || IsWordChar(text, pos + len, false))) {
      ++pos;
      continue;
    }
    size_t begin = pos, end = pos + len;
    if (t.lstrip)
      while (begin > emitted && IsSpaceAt(text, begin, true)) --begin;
    if (t.rstrip)
      while (IsSpaceAt(text, end, false)) ++end;
    if (begin > emitted) DMOE_RETURN_IF_ERROR(on_text(text.substr(emitted, begin - emitted)));
    out->push_back(t.id);
    emitted = pos = end;
  }
  if (emitted < text.size()) DMOE_RETURN_IF_ERROR(on_text(text.substr(emitted)));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
  json j = json::parse(tokenizer_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Invalid(kTokFile, "not valid JSON");
  json c;
  if (!tokenizer_config_json.empty()) {
    c = json::parse(tokenizer_config_json, nullptr, /*allow_exceptions=*/false);
    if (c.is_discarded() || !c.is_object()) return Invalid(kCfgFile, "not a JSON object");
  }
  auto impl = std::make_unique<Impl>();
  try {
    DMOE_RETURN_IF_ERROR(impl->LoadTokenizerJson(j));
    DMOE_RETURN_IF_ERROR(impl->LoadConfig(c, j));
  } catch (const json::exception& e) {
    // A value of the wrong type somewhere (json::value / get throw on those).
    return Invalid(kTokFile, absl::StrCat("unexpected value: ", e.what()));
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& dir) {
  auto read = [](const std::filesystem::path& path, std::string* out) -> bool {
    std::ifstream in(path, std::ios::binary);
    if (!in) return false;
    std::ostringstream ss;
    ss << in.rdbuf();
    *out = std::move(ss).str();
    return true;
  };
  const std::filesystem::path d(dir);
  std::string tok, cfg;
  if (!read(d / kTokFile, &tok))
    return absl::NotFoundError(absl::StrCat((d / kTokFile).string(), ": cannot read"));
  if (std::filesystem::exists(d / kCfgFile) && !read(d / kCfgFile, &cfg))
    return absl::NotFoundError(absl::StrCat((d / kCfgFile).string(), ": cannot read"));
  auto t = FromJson(tok, cfg);
  if (!t.ok()) return absl::Status(t.status().code(), absl::StrCat(dir, "/", t.status().message()));
  return t;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text,
                                                       bool add_special_tokens) const {
  DMOE_RETURN_IF_ERROR(ValidateUtf8(text, "text"));
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special_tokens) out = impl_->prefix_ids;
  const Impl& impl = *impl_;
  auto encode_text = [&](std::string_view piece) { return impl.EncodeText(piece, &out); };
  auto split_normalized = [&](std::string_view piece) {
    return impl.SplitAdded(impl.normalized_trie, piece, encode_text, &out);
  };
  DMOE_RETURN_IF_ERROR(impl.SplitAdded(impl.plain_trie, text, split_normalized, &out));
  if (add_special_tokens) out.insert(out.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
  return out;
}

absl::Status Tokenizer::AppendTokenBytes(int32_t id, bool skip_special_tokens,
                                         std::string* out) const {
  if (id < 0 || id >= static_cast<int32_t>(impl_->id_kind.size()) || impl_->id_kind[id] == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("token id %d is not in the vocabulary (size %d)", id, vocab_size()));
  }
  if (skip_special_tokens && impl_->id_kind[id] == 3) return absl::OkStatus();
  out->append(impl_->id_bytes[id]);
  return absl::OkStatus();
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) DMOE_RETURN_IF_ERROR(AppendTokenBytes(id, skip_special_tokens, &bytes));
  return Utf8Lossy(bytes);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_kind.size()); }

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  auto it = impl_->token_to_id.find(AV(token));
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->id_kind[id] == 3;
}
const std::vector<AddedTokenInfo>& Tokenizer::added_tokens() const { return impl_->added; }
const std::string& Tokenizer::bos_token() const { return impl_->bos_token; }
const std::string& Tokenizer::eos_token() const { return impl_->eos_token; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos_id; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }

absl::StatusOr<std::string> StreamingDetokenizer::Push(int32_t id) {
  scratch_.clear();
  DMOE_RETURN_IF_ERROR(tokenizer_.AppendTokenBytes(id, skip_special_tokens_, &scratch_));
  return utf8_.Push(scratch_);
}

}  // namespace dmoe::text
