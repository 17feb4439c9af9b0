#include "text/tokenizer.h"

#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "text/utf8.h"

namespace dmoe::text {
namespace {

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// DeepSeek-V3's pre-tokenizer regexes, as in its tokenizer.json.
constexpr const char* kDigits = "\\p{N}{1,3}";
constexpr const char* kCjk = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+";
constexpr const char* kWords =
    "[!\"#$%&'()*+,\\-./"
    ":;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}"
    "]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";

// The GPT-2 byte-level string of `bytes`.
std::string ByteLevel(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) {
    int cp = b;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
      int extra = 0;
      for (int x = 0; x < b; ++x)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) ++extra;
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

json Split(const std::string& regex, const std::string& behavior = "Isolated") {
  return {{"type", "Split"},
          {"pattern", {{"Regex", regex}}},
          {"behavior", behavior},
          {"invert", false}};
}

// A byte-level BPE tokenizer: ids 0..255 are the bytes (id == byte value), then
// one token per merge (on raw bytes, in rank order) from id 256.
struct Fixture {
  json pre_tokenizers =
      json::array({Split(kDigits),
                   Split(kCjk),
                   Split(kWords),
                   {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}});
  std::vector<std::pair<std::string, std::string>> merges;
  json added = json::array();
  json post_processor = nullptr;
  json normalizer = {{"type", "Sequence"}, {"normalizers", json::array()}};
  json config = json::object();

  std::string TokenizerJson() const {
    json vocab = json::object();
    for (int b = 0; b < 256; ++b) vocab[ByteLevel(std::string(1, static_cast<char>(b)))] = b;
    json merges_json = json::array();
    int id = 256;
    for (const auto& [a, b] : merges) {
      merges_json.push_back(ByteLevel(a) + " " + ByteLevel(b));
      vocab[ByteLevel(a + b)] = id++;
    }
    return json{{"version", "1.0"},
                {"added_tokens", added},
                {"normalizer", normalizer},
                {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", pre_tokenizers}}},
                {"post_processor", post_processor},
                {"decoder", {{"type", "ByteLevel"}}},
                {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_json}}}}
        .dump();
  }
  std::unique_ptr<Tokenizer> Make() const {
    auto t = Tokenizer::FromJson(TokenizerJson(), config.empty() ? "" : config.dump());
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::move(*t) : nullptr;
  }
};

json Added(int id, const std::string& content, bool special, bool lstrip = false,
           bool rstrip = false) {
  return {{"id", id},         {"content", content},  {"single_word", false}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", false}, {"special", special}};
}

std::vector<int32_t> Enc(const Tokenizer& t, std::string_view s, bool special = false) {
  auto ids = t.Encode(s, special);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(Tokenizer, BytesWithoutMergesAreTheirOwnTokens) {
  Fixture f;
  auto t = f.Make();
  EXPECT_THAT(Enc(*t, "ab\n"), ElementsAre('a', 'b', '\n'));
  EXPECT_EQ(t->vocab_size(), 256);
  // Byte-level strings: space is "Ġ", newline "Ċ".
  EXPECT_EQ(t->TokenToId("\xC4\xA0"), 32);
  EXPECT_EQ(t->TokenToId("\xC4\x8A"), 10);
}

TEST(Tokenizer, MergesApplyLowestRankFirst) {
  Fixture f;
  f.merges = {{"b", "c"}, {"a", "b"}, {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}};
  auto t = f.Make();
  // "a b" would be leftmost, but "b c" has the lower rank.
  EXPECT_THAT(Enc(*t, "abc"), ElementsAre('a', 256));
  EXPECT_THAT(Enc(*t, "hello"), ElementsAre(261));
  EXPECT_THAT(Enc(*t, "helo"), ElementsAre(258, 'l', 'o'));
}

TEST(Tokenizer, EqualRanksMergeLeftmostFirst) {
  Fixture f;
  f.merges = {{"a", "a"}, {"aa", "aa"}};
  auto t = f.Make();
  EXPECT_THAT(Enc(*t, "aaa"), ElementsAre(256, 'a'));
  EXPECT_THAT(Enc(*t, "aaaaa"), ElementsAre(257, 'a'));
}

TEST(Tokenizer, LongWordIsNotQuadratic) {
  Fixture f;
  f.merges = {{"a", "a"}, {"aa", "aa"}, {"aaaa", "aaaa"}};
  auto t = f.Make();
  const std::string word(200000, 'a');  // one pre-token
  auto ids = Enc(*t, word);
  ASSERT_EQ(ids.size(), 200000u / 8);
  for (int32_t id : ids) ASSERT_EQ(id, 258);
}

TEST(Tokenizer, LongWordsMergeRankByRankLikeTheHeap) {
  // Words over 256 bytes merge rank by rank when ranks increase; appending two
  // merges that break the order ("qr s" before "q r") forces the heap
  // everywhere.
  Fixture ordered;
  ordered.merges = {{"a", "b"},  {"b", "a"},   {"a", "a"},   {"ab", "a"},   {"ba", "b"},
                    {"aa", "b"}, {"ab", "ab"}, {"ba", "ab"}, {"aab", "aa"}, {"b", "b"}};
  Fixture heap = ordered;
  heap.merges.push_back({"qr", "s"});
  heap.merges.push_back({"q", "r"});
  auto fast = ordered.Make();
  auto slow = heap.Make();
  std::mt19937 rng(5);
  for (int k = 0; k < 50; ++k) {
    std::string word(257 + rng() % 2000, 'a');
    for (char& c : word) c = rng() % 3 == 0 ? 'b' : 'a';
    ASSERT_EQ(Enc(*fast, word), Enc(*slow, word)) << word;
  }
}

TEST(Tokenizer, PreTokenizerSplitsDigitsCjkAndWhitespaceRuns) {
  Fixture f;
  f.merges = {{"1", "2"}, {"12", "3"},   {"3", "4"},       {" ", " "},
              {" ", "b"}, {"x", "\xE4"}, {"\xE4", "\xBD"}, {"\xE4\xBD", "\xA0"}};
  auto t = f.Make();
  // Digits in threes: "123" "4": without the split, "34" would merge.
  EXPECT_THAT(Enc(*t, "1234"), ElementsAre(257, '4'));
  // "a", "  " (\s+(?!\S) leaves the last space to the word), " b".
  EXPECT_THAT(Enc(*t, "a   b"), ElementsAre('a', 259, 260));
  // Trailing whitespace is one piece.
  EXPECT_THAT(Enc(*t, "a  "), ElementsAre('a', 259));
  // CJK runs are isolated from the Latin text around them.
  EXPECT_THAT(Enc(*t, "x\xE4\xBD\xA0"), ElementsAre('x', 263));
}

TEST(Tokenizer, WhitespaceIsOnigurumasIncludingNel) {
  Fixture f;
  f.pre_tokenizers =
      json::array({Split("\\s", "Removed"), {{"type", "ByteLevel"}, {"use_regex", false}}});
  auto t = f.Make();
  // U+0085 (NEL) is \s in Oniguruma (HF) but not in PCRE2's UCP \s.
  EXPECT_THAT(Enc(*t,
                  "a\xC2\x85"
                  "b\xE3\x80\x80"
                  "c"),
              ElementsAre('a', 'b', 'c'));
  // U+200B (zero width space) is not White_Space.
  EXPECT_EQ(Enc(*t, "a\xE2\x80\x8B").size(), 4u);
}

TEST(Tokenizer, SplitBehaviours) {
  struct Case {
    const char* behavior;
    std::vector<int32_t> ids;
  };
  // Merges make piece boundaries visible: "x-" and "-y" are tokens 256, 257.
  for (const Case& c :
       {Case{"Removed", {'x', 'y'}}, Case{"Isolated", {'x', '-', 'y'}},
        Case{"MergedWithPrevious", {256, 'y'}}, Case{"MergedWithNext", {'x', 257}}}) {
    Fixture f;
    f.merges = {{"x", "-"}, {"-", "y"}};
    f.pre_tokenizers =
        json::array({Split("-", c.behavior), {{"type", "ByteLevel"}, {"use_regex", false}}});
    auto t = f.Make();
    EXPECT_EQ(Enc(*t, "x-y"), c.ids) << c.behavior;
  }
}

TEST(Tokenizer, ByteLevelWithRegexAndPrefixSpace) {
  Fixture f;
  f.merges = {{" ", "h"}, {" h", "i"}};
  f.pre_tokenizers =
      json::array({{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}});
  auto t = f.Make();
  EXPECT_THAT(Enc(*t, "hi hi"), ElementsAre(257, 257));
}

TEST(Tokenizer, AddedTokensAreSplitOutLongestFirst) {
  Fixture f;
  f.added =
      json::array({Added(300, "<s>", true), Added(301, "<a>", false), Added(302, "<a>b", false)});
  auto t = f.Make();
  EXPECT_THAT(Enc(*t, "x<s>y"), ElementsAre('x', 300, 'y'));
  EXPECT_THAT(Enc(*t, "<a>b<a>c"), ElementsAre(302, 301, 'c'));
  EXPECT_THAT(Enc(*t, "<s"), ElementsAre('<', 's'));
  EXPECT_EQ(t->vocab_size(), 303);
  EXPECT_TRUE(t->IsSpecial(300));
  EXPECT_FALSE(t->IsSpecial(301));
}

TEST(Tokenizer, AddedTokenStripsAbsorbWhitespace) {
  Fixture f;
  f.added = json::array({Added(300, "<m>", true, /*lstrip=*/true, /*rstrip=*/true)});
  auto t = f.Make();
  EXPECT_THAT(Enc(*t, "x  <m>  y"), ElementsAre('x', 300, 'y'));
}

TEST(Tokenizer, NormalizedAddedTokensAreMatchedAfterThePlainOnes) {
  Fixture f;
  json n = Added(301, "ab", false);
  n["normalized"] = true;
  f.added = json::array({n, Added(300, "b<", true)});
  auto t = f.Make();
  // "b<" (not normalized) wins over the earlier "ab" (normalized).
  EXPECT_THAT(Enc(*t, "ab<"), ElementsAre('a', 300));
  EXPECT_THAT(Enc(*t, "xab"), ElementsAre('x', 301));
}

TEST(Tokenizer, AddBosFromTokenizerConfig) {
  Fixture f;
  f.added = json::array({Added(300, "<s>", true), Added(301, "</s>", true)});
  f.config = {{"add_bos_token", true},
              {"add_eos_token", false},
              {"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}}},
              {"eos_token", "</s>"},
              {"chat_template", "{{ bos_token }}"}};
  auto t = f.Make();
  EXPECT_THAT(Enc(*t, "a", true), ElementsAre(300, 'a'));
  EXPECT_THAT(Enc(*t, "a", false), ElementsAre('a'));
  EXPECT_EQ(t->bos_id(), 300);
  EXPECT_EQ(t->eos_id(), 301);
  EXPECT_EQ(t->bos_token(), "<s>");
  EXPECT_EQ(t->eos_token(), "</s>");
  EXPECT_EQ(t->chat_template(), "{{ bos_token }}");
}

TEST(Tokenizer, TemplateProcessingWithoutConfig) {
  Fixture f;
  f.added = json::array({Added(300, "<s>", true), Added(301, "</s>", true)});
  f.post_processor = {
      {"type", "TemplateProcessing"},
      {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}})},
      {"special_tokens",
       {{"<s>", {{"id", "<s>"}, {"ids", {300}}, {"tokens", {"<s>"}}}},
        {"</s>", {{"id", "</s>"}, {"ids", {301}}, {"tokens", {"</s>"}}}}}}};
  auto t = f.Make();
  EXPECT_THAT(Enc(*t, "a", true), ElementsAre(300, 'a', 301));
}

TEST(Tokenizer, DecodeRoundTripsAndSkipsSpecialTokens) {
  Fixture f;
  f.merges = {{"h", "e"}, {" ", "w"}};
  f.added = json::array({Added(300, "<s>", true), Added(301, "<x>", false)});
  auto t = f.Make();
  const std::string text = "<s>he said \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80<x>\n\t end";
  auto ids = Enc(*t, text);
  auto back = t->Decode(ids);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, text);
  auto skipped = t->Decode(ids, /*skip_special_tokens=*/true);
  ASSERT_TRUE(skipped.ok());
  EXPECT_EQ(*skipped, text.substr(3));
}

TEST(Tokenizer, DecodeReplacesIllFormedBytes) {
  Fixture f;
  auto t = f.Make();
  const std::vector<int32_t> ids = {'a', 0xE4, 0xBD, 'b', 0xFF};
  auto s = t->Decode(ids);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s,
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD");
}

TEST(Tokenizer, InvalidInputsAreClearErrors) {
  Fixture f;
  auto t = f.Make();
  auto bad = t->Encode("ok\xC3\x28");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("text: invalid UTF-8 at byte 2 (0xc3)"));
  auto bad_id = t->Decode(std::vector<int32_t>{5, 256});
  ASSERT_FALSE(bad_id.ok());
  EXPECT_THAT(bad_id.status().message(), HasSubstr("token id 256 is not in the vocabulary"));
}

TEST(Tokenizer, UnsupportedFeaturesFailAtLoad) {
  {
    Fixture f;
    f.normalizer = {{"type", "NFC"}};
    auto t = Tokenizer::FromJson(f.TokenizerJson(), "");
    ASSERT_FALSE(t.ok());
    EXPECT_THAT(t.status().message(), HasSubstr("normalizer"));
  }
  {
    Fixture f;
    f.pre_tokenizers = json::array({{{"type", "Metaspace"}}});
    auto t = Tokenizer::FromJson(f.TokenizerJson(), "");
    ASSERT_FALSE(t.ok());
    EXPECT_THAT(t.status().message(), HasSubstr("pre_tokenizer type 'Metaspace' is not supported"));
  }
  {
    Fixture f;
    f.pre_tokenizers = json::array({Split("(unclosed"), {{"type", "ByteLevel"}}});
    auto t = Tokenizer::FromJson(f.TokenizerJson(), "");
    ASSERT_FALSE(t.ok());
    EXPECT_THAT(t.status().message(), HasSubstr("regex /(unclosed/"));
  }
  auto missing = Tokenizer::Load("/nonexistent-dir");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(Tokenizer, StreamingNeverEmitsHalfACharacter) {
  Fixture f;
  f.added = json::array({Added(300, "<s>", true)});
  auto t = f.Make();
  // "é" = C3 A9 and "😀" = F0 9F 98 80, one byte-level token per byte.
  StreamingDetokenizer d(*t);
  std::vector<std::string> out;
  for (int32_t id : std::vector<int32_t>{300, 'a', 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80, 'z'}) {
    auto s = d.Push(id);
    ASSERT_TRUE(s.ok());
    out.push_back(*s);
  }
  EXPECT_THAT(out, ElementsAre("<s>", "a", "", "\xC3\xA9", "", "", "", "\xF0\x9F\x98\x80", "z"));
  // An unfinished character at the end is one U+FFFD.
  StreamingDetokenizer e(*t, /*skip_special_tokens=*/true);
  EXPECT_EQ(*e.Push(300), "");
  EXPECT_EQ(*e.Push(0xE4), "");
  EXPECT_EQ(e.pending(), 1u);
  EXPECT_EQ(e.Finish(), "\xEF\xBF\xBD");
}

TEST(Tokenizer, ConcurrentEncodersAgree) {
  Fixture f;
  f.merges = {{"t", "h"}, {"th", "e"}, {" ", "the"}};
  auto t = f.Make();
  std::string text;
  for (int i = 0; i < 2000; ++i) text += "the cat and the " + std::to_string(i) + " hats\n";
  const auto expected = Enc(*t, text);
  std::vector<std::thread> threads;
  std::vector<bool> same(4, false);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] { same[k] = *t->Encode(text) == expected; });
  }
  for (auto& th : threads) th.join();
  EXPECT_THAT(same, ElementsAre(true, true, true, true));
}

TEST(Utf8, LossyUsesMaximalSubparts) {
  // E0 80: E0 needs A0..BF next, so E0 alone is a maximal subpart, then 80.
  EXPECT_EQ(Utf8Lossy("\xE0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");
  // F0 9F 98 then 'x': one replacement for the truncated sequence.
  EXPECT_EQ(Utf8Lossy("\xF0\x9F\x98x"), "\xEF\xBF\xBDx");
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"),
            "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_TRUE(ValidateUtf8("\xF4\x8F\xBF\xBF").ok());
  EXPECT_FALSE(ValidateUtf8("\xF4\x90\x80\x80").ok());
}

TEST(Utf8, StreamingEqualsLossyForEverySplit) {
  const std::string s = "a\xC3\xA9\xE0\x80\xF0\x9F\x98\x80\xF0\x9Fz\xFF\xE4\xBD\xA0";
  for (size_t cut1 = 0; cut1 <= s.size(); ++cut1) {
    for (size_t cut2 = cut1; cut2 <= s.size(); ++cut2) {
      Utf8StreamDecoder d;
      std::string out = d.Push(s.substr(0, cut1));
      out += d.Push(s.substr(cut1, cut2 - cut1));
      out += d.Push(s.substr(cut2));
      out += d.Finish();
      ASSERT_EQ(out, Utf8Lossy(s)) << cut1 << " " << cut2;
    }
  }
}

}  // namespace
}  // namespace dmoe::text
