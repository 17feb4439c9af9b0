#include "gateway/openai_protocol.h"

#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "gateway/internal/http_errors.h"
#include "gateway/testing/tokenizer_fixture.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "text/chat_template.h"

namespace dmoe::gateway {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

absl::StatusOr<ParsedRequest> Completion(const std::string& body) {
  return ParseGenerateRequest(body, ApiKind::kCompletion, ParseOptions{});
}
absl::StatusOr<ParsedRequest> Chat(const std::string& body) {
  return ParseGenerateRequest(body, ApiKind::kChatCompletion, ParseOptions{});
}

void ExpectInvalid(const absl::StatusOr<ParsedRequest>& r, const std::string& param,
                   const std::string& message) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_EQ(ParamOf(r.status()), param) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(message));
}

TEST(ParseCompletion, DefaultsFollowOpenAI) {
  absl::StatusOr<ParsedRequest> r = Completion(R"({"prompt":[5,6]})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->upstream.prompt_tokens(), ElementsAre(5, 6));
  EXPECT_EQ(r->upstream.max_tokens(), 16u);
  EXPECT_FLOAT_EQ(r->upstream.sampling().temperature(), 1.0f);
  EXPECT_FLOAT_EQ(r->upstream.sampling().top_p(), 1.0f);
  EXPECT_EQ(r->upstream.sampling().top_k(), 0u);
  EXPECT_FALSE(r->has_seed);
  EXPECT_FALSE(r->stream);
  EXPECT_TRUE(r->upstream.stop_token_ids().empty());
}

TEST(ParseCompletion, NullMeansDefault) {
  absl::StatusOr<ParsedRequest> r = Completion(
      R"({"prompt":[1],"max_tokens":null,"temperature":null,"top_p":null,"seed":null,
          "stop":null,"stream":null,"model":null,"n":null,"logprobs":null})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->upstream.max_tokens(), 16u);
}

TEST(ParseCompletion, AllParameters) {
  absl::StatusOr<ParsedRequest> r = Completion(
      R"({"model":"dmoe","prompt":[[1,2,3]],"max_tokens":7,"temperature":0,"top_p":0.5,
          "top_k":-1,"seed":18446744073709551615,"stop":42,"stream":true,"ignore_eos":true,
          "n":1,"echo":false,"logprobs":false,"presence_penalty":0,"user":"u",
          "stream_options":{"include_usage":true},"some_future_field":{"x":1}})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->upstream.prompt_tokens(), ElementsAre(1, 2, 3));
  EXPECT_EQ(r->upstream.max_tokens(), 7u);
  EXPECT_FLOAT_EQ(r->upstream.sampling().temperature(), 0.0f);
  EXPECT_FLOAT_EQ(r->upstream.sampling().top_p(), 0.5f);
  EXPECT_EQ(r->upstream.sampling().top_k(), 0u);
  EXPECT_EQ(r->upstream.sampling().seed(), ~uint64_t{0});
  EXPECT_TRUE(r->has_seed);
  EXPECT_THAT(r->upstream.stop_token_ids(), ElementsAre(42));
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->upstream.ignore_eos());
}

TEST(ParseCompletion, RejectsWithTheParameterNamed) {
  ExpectInvalid(Completion(R"({"prompt":[1],"temperature":2.01})"), "temperature", "[0, 2]");
  ExpectInvalid(Completion(R"({"prompt":[1],"top_p":-0.1})"), "top_p", "(0, 1]");
  ExpectInvalid(Completion(R"({"prompt":[1],"max_tokens":-3})"), "max_tokens", "[1, ");
  ExpectInvalid(Completion(R"({"prompt":[1],"max_tokens":99999999999})"), "max_tokens", "[1, ");
  ExpectInvalid(Completion(R"({"prompt":[1],"top_k":-2})"), "top_k", "[-1, ");
  ExpectInvalid(Completion(R"({"prompt":[2147483648]})"), "prompt", "prompt[0]");
  ExpectInvalid(Completion(R"({"prompt":[1,true]})"), "prompt", "got boolean");
  ExpectInvalid(Completion(R"({"prompt":{"a":1}})"), "prompt", "got object");
  ExpectInvalid(Completion(R"({"prompt":[1],"stop":["\n"]})"), "stop", "tokenizer");
  ExpectInvalid(Completion(R"({"prompt":[1],"stop":{}})"), "stop", "got object");
  ExpectInvalid(Completion(R"({"prompt":[1],"echo":true})"), "echo", "not supported");
  ExpectInvalid(Completion(R"({"prompt":[1],"logprobs":2})"), "logprobs", "not supported");
  ExpectInvalid(Completion(R"({"prompt":[1],"frequency_penalty":0.5})"), "frequency_penalty",
                "not supported");
  ExpectInvalid(Completion(R"({"prompt":[1],"logit_bias":{"5":1}})"), "logit_bias",
                "not supported");
  ExpectInvalid(Completion(R"({"prompt":[1],"best_of":3})"), "best_of", "best_of=1");
  ExpectInvalid(Completion(R"({"prompt":[1],"stream_options":{"include_usage":1}})"),
                "stream_options.include_usage", "a boolean");
  ExpectInvalid(Completion(R"({"prompt":[1],"temperature":1e400})"), "", "number overflow");
}

TEST(ParseCompletion, MaxTokensLimitIsAnOption) {
  ParseOptions o;
  o.max_tokens_limit = 100;
  ExpectInvalid(ParseGenerateRequest(R"({"prompt":[1],"max_tokens":101})", ApiKind::kCompletion, o),
                "max_tokens", "[1, 100]");
}

TEST(ParseCompletion, OtherModelIsNotFound) {
  absl::StatusOr<ParsedRequest> r = Completion(R"({"model":"gpt-4","prompt":[1]})");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ParamOf(r.status()), "model");
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("'dmoe'"));
}

TEST(ParseCompletion, MalformedBodies) {
  ExpectInvalid(Completion(""), "", "not valid JSON");
  ExpectInvalid(Completion("{\"prompt\":[1]"), "", "not valid JSON");
  ExpectInvalid(Completion("\"just a string\""), "", "must be a JSON object");
  ExpectInvalid(Completion(std::string(100, '[') + std::string(100, ']')), "", "nests deeper");
  // Brackets inside strings do not count as nesting.
  EXPECT_TRUE(Completion(R"({"prompt":[1],"user":")" + std::string(100, '[') + R"("})").ok());
  ExpectInvalid(Completion("{\"prompt\":[1],\"user\":\"\xff\"}"), "", "not valid JSON");
}

TEST(ParseChat, ConcatenatesContentsInOrder) {
  absl::StatusOr<ParsedRequest> r = Chat(
      R"({"messages":[{"role":"system","content":[1]},{"role":"user","content":[2,3]},
          {"role":"assistant","content":[4],"name":"bot"}],"max_tokens":3,
          "max_completion_tokens":5,"response_format":{"type":"text"},"tools":[]})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->upstream.prompt_tokens(), ElementsAre(1, 2, 3, 4));
  EXPECT_EQ(r->upstream.max_tokens(), 5u);  // max_completion_tokens wins
  EXPECT_EQ(r->kind, ApiKind::kChatCompletion);
}

// The sampling fields of a chat request are those of the same completion
// request: the seed (0 included) is kept and marked as given; none given is
// "draw one".
TEST(ParseChat, KeepsTheSeedAsCompletionsDo) {
  for (const char* seed : {"7", "0", "-1"}) {
    const std::string sampling =
        absl::StrCat(R"("temperature":1,"top_p":0.5,"top_k":9,"seed":)", seed);
    absl::StatusOr<ParsedRequest> chat =
        Chat(absl::StrCat(R"({"messages":[{"role":"user","content":[1,2]}],)", sampling, "}"));
    absl::StatusOr<ParsedRequest> completion =
        Completion(absl::StrCat(R"({"prompt":[1,2],)", sampling, "}"));
    ASSERT_TRUE(chat.ok()) << chat.status();
    ASSERT_TRUE(completion.ok()) << completion.status();
    EXPECT_TRUE(chat->has_seed) << seed;
    EXPECT_TRUE(chat->upstream.sampling().has_seed()) << seed;
    EXPECT_EQ(chat->upstream.sampling().SerializeAsString(),
              completion->upstream.sampling().SerializeAsString())
        << seed;
  }
  absl::StatusOr<ParsedRequest> chat =
      Chat(R"({"messages":[{"role":"user","content":[1]}],"seed":7})");
  ASSERT_TRUE(chat.ok());
  EXPECT_EQ(chat->upstream.sampling().seed(), 7u);
  absl::StatusOr<ParsedRequest> unseeded = Chat(R"({"messages":[{"role":"user","content":[1]}]})");
  ASSERT_TRUE(unseeded.ok());
  EXPECT_FALSE(unseeded->has_seed);
  EXPECT_FALSE(unseeded->upstream.sampling().has_seed());
  ExpectInvalid(Chat(R"({"messages":[{"role":"user","content":[1]}],"seed":"7"})"), "seed",
                "an integer");
}

TEST(ParseChat, RejectsTextAndMalformedMessages) {
  ExpectInvalid(Chat(R"({"messages":[{"role":"user","content":"hi"}]})"), "messages[0].content",
                "chat template");
  ExpectInvalid(Chat(R"({"messages":[{"role":"user","content":[1]},{"content":[2]}]})"),
                "messages[1].role", "required");
  ExpectInvalid(Chat(R"({"messages":[{"role":"user"}]})"), "messages[0].content", "required");
  ExpectInvalid(Chat(R"({"messages":[{"role":"user","content":[]}]})"), "messages", "no token");
  ExpectInvalid(Chat(R"({"messages":"hi"})"), "messages", "a list");
  ExpectInvalid(Chat(R"({"prompt":[1]})"), "messages", "required");
  ExpectInvalid(Chat(R"({"messages":[{"role":"user","content":[1]}],"tools":[{}]})"), "tools",
                "not supported");
  ExpectInvalid(Chat(R"({"messages":[{"role":"user","content":[1]}],"max_completion_tokens":0})"),
                "max_completion_tokens", "[1, ");
  ExpectInvalid(
      Chat(
          R"({"messages":[{"role":"user","content":[1]}],"response_format":{"type":"json_object"}})"),
      "response_format", "text");
}

// Issue 13.5: add_special_tokens was checked only for text prompts, so with
// token ids (or on the chat endpoint) [], {} or 1.5 were accepted. Every
// boolean field is now checked the same way whatever the prompt's form.
constexpr const char* kBooleanFields[] = {"stream", "ignore_eos",         "skip_special_tokens",
                                          "echo",   "add_special_tokens", "add_generation_prompt"};

TEST(ParseRequest, EveryBooleanFieldRefusesOtherTypesOnBothEndpoints) {
  const std::pair<const char*, const char*> bad[] = {{"[]", "array"},   {"{}", "object"},
                                                     {"1.5", "number"}, {"1", "integer"},
                                                     {"0", "integer"},  {R"("true")", "string"}};
  for (const char* field : kBooleanFields) {
    for (const auto& [value, type] : bad) {
      SCOPED_TRACE(absl::StrCat(field, ": ", value));
      const std::string extra = absl::StrCat(R"(,")", field, R"(":)", value, "}");
      const std::string want = absl::StrCat(field, " must be a boolean, got ", type);
      ExpectInvalid(Completion(absl::StrCat(R"({"prompt":[1])", extra)), field, want);
      ExpectInvalid(Chat(absl::StrCat(R"({"messages":[{"role":"user","content":[1]}])", extra)),
                    field, want);
    }
    // null is the default, as for every field; true and false parse.
    for (const char* ok : {"null", "false"}) {
      const std::string extra = absl::StrCat(R"(,")", field, R"(":)", ok, "}");
      EXPECT_TRUE(Completion(absl::StrCat(R"({"prompt":[1])", extra)).ok()) << field << ok;
      EXPECT_TRUE(Chat(absl::StrCat(R"({"messages":[{"role":"user","content":[1]}])", extra)).ok())
          << field << ok;
    }
  }
  EXPECT_TRUE(
      Completion(R"({"prompt":[1],"add_special_tokens":true,"add_generation_prompt":true})").ok());
}

TEST(ParseRequest, RandomMutationsNeverThrow) {
  // A cheap stand-in for a fuzzer: byte flips, truncations and splices of valid bodies.
  const std::string seeds[] = {
      R"({"model":"dmoe","prompt":[[1,2,3]],"max_tokens":7,"temperature":0.5,"top_p":0.9,"seed":3,"stop":[1,2],"stream":true})",
      R"({"messages":[{"role":"user","content":[1,2]},{"role":"assistant","content":[3]}],"n":1,"stream_options":{"include_usage":true}})",
  };
  std::mt19937 rng(1234);
  const std::string alphabet = "{}[]\",:0123456789.-eE truefalsnul\\\xff";
  int ok = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string s = seeds[rng() % 2];
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits && !s.empty(); ++e) {
      const size_t pos = rng() % s.size();
      switch (rng() % 3) {
        case 0:
          s[pos] = alphabet[rng() % alphabet.size()];
          break;
        case 1:
          s.erase(pos, 1 + rng() % 8);
          break;
        case 2:
          s.insert(pos, 1, alphabet[rng() % alphabet.size()]);
          break;
      }
    }
    for (ApiKind kind : {ApiKind::kCompletion, ApiKind::kChatCompletion}) {
      absl::StatusOr<ParsedRequest> r = ParseGenerateRequest(s, kind, ParseOptions{});
      if (r.ok()) {
        ++ok;
        EXPECT_GT(r->upstream.prompt_tokens_size(), 0);
        EXPECT_GE(r->upstream.max_tokens(), 1u);
      } else {
        EXPECT_FALSE(r.status().message().empty());
      }
    }
  }
  EXPECT_GT(ok, 0);
}

TEST(Responses, CompletionAndChatShapes) {
  CompletionMeta meta{ApiKind::kCompletion, "cmpl-1", 1700000000, "dmoe"};
  EXPECT_EQ(Dump(ResponseJson(meta, {4, 5}, "length", 3)),
            R"({"id":"cmpl-1","object":"text_completion","created":1700000000,"model":"dmoe",)"
            R"("choices":[{"index":0,"text":"","token_ids":[4,5],"logprobs":null,)"
            R"("finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":2,)"
            R"("total_tokens":5}})");
  meta.kind = ApiKind::kChatCompletion;
  const nlohmann::ordered_json chunk = TokenChunkJson(meta, 9, /*first=*/true);
  EXPECT_EQ(chunk["object"], "chat.completion.chunk");
  EXPECT_EQ(chunk["choices"][0]["delta"]["role"], "assistant");
  const nlohmann::ordered_json final_chunk = FinalChunkJson(meta, "stop", 3, 1);
  EXPECT_EQ(final_chunk["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(final_chunk["usage"]["total_tokens"], 4);
  // Invalid UTF-8 in a message is replaced, not thrown on.
  EXPECT_THAT(Dump(ErrorJson("bad \xff byte", "invalid_request_error", "", "")),
              HasSubstr("bad \xef\xbf\xbd byte"));
}

TEST(MapError, StatusCodesAndRouterParams) {
  using internal::MapError;
  EXPECT_EQ(MapError(absl::ResourceExhaustedError("full"), ApiKind::kCompletion, true).status, 429);
  EXPECT_EQ(MapError(absl::UnavailableError("down"), ApiKind::kCompletion, true).status, 503);
  EXPECT_EQ(MapError(absl::DeadlineExceededError("slow"), ApiKind::kCompletion, true).status, 504);
  EXPECT_EQ(MapError(absl::InternalError("boom"), ApiKind::kCompletion, true).status, 502);
  EXPECT_EQ(MapError(absl::InternalError("boom"), ApiKind::kCompletion, false).status, 500);
  // The soak found an expert server without its placement version reported
  // as the client's fault (400): it is the cluster's state.
  const internal::HttpError state =
      MapError(absl::FailedPreconditionError("placement version 1 not held (holding 0)"),
               ApiKind::kCompletion, true);
  EXPECT_EQ(state.status, 503);
  EXPECT_EQ(state.type, "server_error");
  const internal::HttpError ctx = MapError(
      absl::InvalidArgumentError("router r: prompt (9 tokens) + max_tokens (9) = 18 exceeds the "
                                 "model's context of 16 tokens"),
      ApiKind::kCompletion, true);
  EXPECT_EQ(ctx.status, 400);
  EXPECT_EQ(ctx.param, "max_tokens");
  EXPECT_EQ(
      MapError(absl::InvalidArgumentError("prompt_tokens[3] = 99999 is outside the vocabulary"),
               ApiKind::kChatCompletion, true)
          .param,
      "messages");
}

class ParseText : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(tok_, nullptr);
    auto t = text::ChatTemplate::Parse(tok_->chat_template());
    ASSERT_TRUE(t.ok()) << t.status();
    tmpl_ = *std::move(t);
    options_.tokenizer = tok_.get();
    options_.chat_template = tmpl_.get();
  }
  absl::StatusOr<ParsedRequest> Parse(const std::string& body, ApiKind kind) {
    return ParseGenerateRequest(body, kind, options_);
  }
  std::unique_ptr<text::Tokenizer> tok_ = testing::TestTokenizer();
  std::unique_ptr<text::ChatTemplate> tmpl_;
  ParseOptions options_;
};

TEST_F(ParseText, TextPromptsStopStringsAndOptions) {
  auto r = Parse(R"({"prompt":"Hi","stop":["x","yz"],"skip_special_tokens":false})",
                 ApiKind::kCompletion);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->upstream.prompt_tokens(), ElementsAre(1000, 'H', 'i'));
  EXPECT_THAT(r->stop_strings, ElementsAre("x", "yz"));
  EXPECT_TRUE(r->upstream.stop_token_ids().empty());
  EXPECT_FALSE(r->skip_special_tokens);
  auto one =
      Parse(R"({"prompt":["Hi"],"stop":"\n","add_special_tokens":false})", ApiKind::kCompletion);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_THAT(one->upstream.prompt_tokens(), ElementsAre('H', 'i'));
  EXPECT_THAT(one->stop_strings, ElementsAre("\n"));
  ExpectInvalid(Parse(R"({"prompt":["a","b"]})", ApiKind::kCompletion), "prompt", "one prompt");
  ExpectInvalid(Parse(R"({"prompt":"a","stop":["a",1]})", ApiKind::kCompletion), "stop",
                "stop[1] must be a string");
  ExpectInvalid(Parse(R"({"prompt":"a","stop":[""]})", ApiKind::kCompletion), "stop", "empty");
  ExpectInvalid(Parse(R"({"prompt":"a","stop":["1","2","3","4","5","6","7","8","9","10","11",
                "12","13","14","15","16","17"]})",
                      ApiKind::kCompletion),
                "stop", "at most 16");
  ExpectInvalid(Parse(R"({"prompt":"a","add_special_tokens":1})", ApiKind::kCompletion),
                "add_special_tokens", "a boolean");
  // The same checks on the text paths (where the two fields are read).
  for (const char* field : kBooleanFields) {
    SCOPED_TRACE(field);
    const std::string extra = absl::StrCat(R"(,")", field, R"(":[]})");
    const std::string want = absl::StrCat(field, " must be a boolean, got array");
    ExpectInvalid(Parse(absl::StrCat(R"({"prompt":"a")", extra), ApiKind::kCompletion), field,
                  want);
    ExpectInvalid(Parse(absl::StrCat(R"({"messages":[{"role":"user","content":"a"}])", extra),
                        ApiKind::kChatCompletion),
                  field, want);
  }
}

TEST_F(ParseText, ChatMessagesThroughTheTemplate) {
  auto r = Parse(R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":"Hi"},
      {"role":"assistant","content":"A"},{"role":"user","content":[{"type":"text","text":"x"}]}]})",
                 ApiKind::kChatCompletion);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(
      std::vector<int32_t>(r->upstream.prompt_tokens().begin(), r->upstream.prompt_tokens().end()),
      *tok_->Encode("<s>S\n<|user|>Hi<|assistant|>A</s><|user|>x<|assistant|>", false));
  ExpectInvalid(
      Parse(R"({"messages":[{"role":"user","content":"raise"}]})", ApiKind::kChatCompletion),
      "messages", "no raising");
  ExpectInvalid(
      Parse(R"({"messages":[{"role":"user","content":"a"},{"role":"user","content":[1]}]})",
            ApiKind::kChatCompletion),
      "messages", "mix text and token-id");
  // Text messages keep the seed too (the template path).
  auto seeded = Parse(R"({"messages":[{"role":"user","content":"Hi"}],"seed":7,"temperature":1})",
                      ApiKind::kChatCompletion);
  ASSERT_TRUE(seeded.ok()) << seeded.status();
  EXPECT_TRUE(seeded->has_seed);
  EXPECT_TRUE(seeded->upstream.sampling().has_seed());
  EXPECT_EQ(seeded->upstream.sampling().seed(), 7u);
  EXPECT_FLOAT_EQ(seeded->upstream.sampling().temperature(), 1.0f);
  options_.chat_template = nullptr;
  options_.chat_template_error = "unsupported tag 'macro'";
  auto none = Parse(R"({"messages":[{"role":"user","content":"a"}]})", ApiKind::kChatCompletion);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("unsupported tag 'macro'"));
}

}  // namespace
}  // namespace dmoe::gateway
