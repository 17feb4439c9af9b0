// The gateway in-process, in front of fake routers (gateway/testing/fake_router.h),
// driven over real HTTP (httplib::Client, raw sockets) and gRPC on loopback.
#include "gateway/gateway.h"

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gateway/testing/fake_router.h"
#include "gateway/testing/tokenizer_fixture.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "testing/http.h"
#include "text/chat_template.h"

namespace dmoe::gateway {
namespace {

using json = nlohmann::json;
using testing::FakeRouter;
using testing::FakeRouterServer;
using ::testing::HasSubstr;

// The token ids the fake answers for `prompt` and `n` tokens.
std::vector<int32_t> Expected(const std::vector<int32_t>& prompt, int n) {
  v1::GenerateRequest r;
  for (int32_t t : prompt) r.add_prompt_tokens(t);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(FakeRouter::Token(r, i));
  return out;
}

// The `data:` payloads of an SSE body, in order.
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  for (absl::string_view event : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StartsWith(event, "data: ")) << event;
    out.emplace_back(event.substr(6));
  }
  return out;
}

// Waits until `pred` holds, up to `timeout`.
template <typename Pred>
bool WaitFor(Pred pred, absl::Duration timeout) {
  const absl::Time until = absl::Now() + timeout;
  while (!pred()) {
    if (absl::Now() > until) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

class GatewayTest : public ::testing::Test {
 protected:
  void SetUp() override { routers_.push_back(std::make_unique<FakeRouterServer>()); }

  FakeRouter& fake(int i = 0) { return routers_[i]->service; }

  // Starts the gateway in front of every fake in routers_ (plus `extra` addresses).
  void StartGateway(int max_inflight = 16, std::vector<std::string> extra = {}) {
    GatewayOptions o;
    for (const auto& r : routers_) o.routers.push_back(r->address());
    for (auto& e : extra) o.routers.push_back(e);
    o.grpc_port = 0;
    o.max_inflight = max_inflight;
    o.poll_interval = absl::Milliseconds(50);
    o.poll_timeout = absl::Milliseconds(500);
    o.http.model_name = "test-model";
    o.http.max_body_bytes = 64 << 10;
    o.http.request_timeout = absl::Seconds(30);
    if (tokenizer_ != nullptr) {
      o.http.tokenizer = tokenizer_;
      auto t = text::ChatTemplate::Parse(tokenizer_->chat_template());
      ASSERT_TRUE(t.ok()) << t.status();
      o.http.chat_template = *std::move(t);
    }
    absl::StatusOr<std::unique_ptr<Gateway>> gw = Gateway::Start(std::move(o));
    ASSERT_TRUE(gw.ok()) << gw.status();
    gw_ = *std::move(gw);
    // The first poll may time out on a loaded machine (the fakes are up, the
    // connection is not yet): start the test once every fake is seen healthy.
    ASSERT_TRUE(
        WaitFor([&] { return gw_->routers().HealthyCount() == static_cast<int>(routers_.size()); },
                absl::Seconds(20)))
        << "the gateway never saw all " << routers_.size() << " fake routers healthy";
  }

  httplib::Result Post(const std::string& path, const std::string& body) {
    httplib::Client c("127.0.0.1", gw_->http_port());
    c.set_read_timeout(30, 0);
    return c.Post(path.c_str(), body, "application/json");
  }
  httplib::Result Get(const std::string& path) {
    httplib::Client c("127.0.0.1", gw_->http_port());
    c.set_read_timeout(30, 0);
    return c.Get(path.c_str());
  }

  // Expects a JSON error with `status` whose param is `param` ("" = null).
  json ExpectError(const httplib::Result& r, int status, const std::string& param) {
    EXPECT_TRUE(r) << "no response";
    if (!r) return json();
    EXPECT_EQ(r->status, status) << r->body;
    EXPECT_EQ(r->get_header_value("Content-Type"), "application/json");
    json j = json::parse(r->body, nullptr, false);
    EXPECT_TRUE(j.contains("error")) << r->body;
    if (!j.contains("error")) return j;
    EXPECT_TRUE(j["error"]["message"].is_string());
    EXPECT_FALSE(j["error"]["message"].get<std::string>().empty());
    EXPECT_TRUE(j["error"]["type"].is_string());
    if (param.empty()) {
      EXPECT_TRUE(j["error"]["param"].is_null()) << r->body;
    } else {
      EXPECT_EQ(j["error"]["param"], param) << r->body;
    }
    return j;
  }

  std::vector<std::unique_ptr<FakeRouterServer>> routers_;
  std::unique_ptr<Gateway> gw_;
  std::shared_ptr<const text::Tokenizer> tokenizer_;  // set before StartGateway: text API
};

// The gateway with the test tokenizer (gateway/testing/tokenizer_fixture.h).
class GatewayTextTest : public GatewayTest {
 protected:
  void SetUp() override {
    GatewayTest::SetUp();
    tokenizer_ = testing::TestTokenizer();
    ASSERT_NE(tokenizer_, nullptr);
  }
  std::vector<int32_t> Encode(const std::string& text, bool special) {
    auto ids = tokenizer_->Encode(text, special);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int32_t>{};
  }
  std::vector<int32_t> Seen() {
    const v1::GenerateRequest r = fake().last_request();
    return std::vector<int32_t>(r.prompt_tokens().begin(), r.prompt_tokens().end());
  }
  // The concatenated text of an SSE answer, and its chunks' texts.
  std::string StreamText(const std::string& body, bool chat, std::vector<std::string>* pieces,
                         json* last = nullptr) {
    std::string text;
    for (const std::string& d : SseData(body)) {
      if (d == "[DONE]") break;
      const json c = json::parse(d);
      const json& choice = c["choices"][0];
      std::string piece;
      if (!chat) {
        piece = choice["text"].get<std::string>();
      } else if (choice["delta"].contains("content")) {
        piece = choice["delta"]["content"].get<std::string>();
      }
      pieces->push_back(piece);
      text += piece;
      if (last != nullptr) *last = c;
    }
    return text;
  }
};

TEST_F(GatewayTest, Completion_ReturnsTokensFinishReasonAndUsage) {
  StartGateway();
  auto r = Post("/v1/completions",
                R"({"model":"test-model","prompt":[3,4,5],"max_tokens":5,"temperature":0})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  EXPECT_THAT(j["id"].get<std::string>(), ::testing::StartsWith("cmpl-"));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "test-model");
  EXPECT_GT(j["created"].get<int64_t>(), 1600000000);
  ASSERT_EQ(j["choices"].size(), 1u);
  EXPECT_EQ(j["choices"][0]["index"], 0);
  EXPECT_EQ(j["choices"][0]["text"], "");
  EXPECT_EQ(j["choices"][0]["token_ids"].get<std::vector<int32_t>>(), Expected({3, 4, 5}, 5));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 3);
  EXPECT_EQ(j["usage"]["completion_tokens"], 5);
  EXPECT_EQ(j["usage"]["total_tokens"], 8);
}

TEST_F(GatewayTest, Completion_ForwardsSamplingOptionsAndStopIds) {
  StartGateway();
  // The fake's 3rd token for prompt [10] is 12: a stop id ends the stream there.
  auto r = Post("/v1/completions", R"({"prompt":[[10]],"max_tokens":9,"temperature":0.5,
                "top_p":0.9,"top_k":40,"seed":-1,"stop":[12, 999]})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  EXPECT_EQ(j["choices"][0]["token_ids"].get<std::vector<int32_t>>(),
            (std::vector<int32_t>{10, 11, 12}));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  const v1::GenerateRequest seen = fake().last_request();
  EXPECT_EQ(seen.max_tokens(), 9u);
  EXPECT_FLOAT_EQ(seen.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(seen.sampling().top_p(), 0.9f);
  EXPECT_EQ(seen.sampling().top_k(), 40u);
  EXPECT_EQ(seen.sampling().seed(), ~uint64_t{0});
  EXPECT_THAT(seen.stop_token_ids(), ::testing::ElementsAre(12, 999));
  EXPECT_EQ(seen.request_id(), j["id"]);
}

TEST_F(GatewayTest, Completion_DefaultsMaxTokens16AndDrawsASeed) {
  StartGateway();
  auto r1 = Post("/v1/completions", R"({"prompt":[1]})");
  ASSERT_TRUE(r1);
  ASSERT_EQ(r1->status, 200) << r1->body;
  const v1::GenerateRequest a = fake().last_request();
  EXPECT_EQ(a.max_tokens(), 16u);
  EXPECT_FLOAT_EQ(a.sampling().temperature(), 1.0f);
  auto r2 = Post("/v1/completions", R"({"prompt":[1]})");
  ASSERT_TRUE(r2);
  // Unseeded requests must not all sample alike.
  EXPECT_NE(fake().last_request().sampling().seed(), a.sampling().seed());
}

TEST_F(GatewayTest, Completion_StreamsOneChunkPerTokenThenFinalChunkAndDone) {
  StartGateway();
  auto r = Post("/v1/completions", R"({"prompt":[7,8],"max_tokens":4,"stream":true})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_THAT(r->get_header_value("Content-Type"), HasSubstr("text/event-stream"));
  const std::vector<std::string> data = SseData(r->body);
  ASSERT_EQ(data.size(), 4u + 2u) << r->body;
  const std::vector<int32_t> want = Expected({7, 8}, 4);
  std::string id;
  for (int i = 0; i < 4; ++i) {
    const json c = json::parse(data[i]);
    EXPECT_EQ(c["object"], "text_completion");
    if (i == 0) id = c["id"];
    EXPECT_EQ(c["id"], id);
    EXPECT_EQ(c["choices"][0]["token_ids"], json::array({want[i]}));
    EXPECT_TRUE(c["choices"][0]["finish_reason"].is_null());
  }
  const json last = json::parse(data[4]);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(last["choices"][0]["token_ids"], json::array());
  EXPECT_EQ(last["usage"]["prompt_tokens"], 2);
  EXPECT_EQ(last["usage"]["completion_tokens"], 4);
  EXPECT_EQ(last["usage"]["total_tokens"], 6);
  EXPECT_EQ(data[5], "[DONE]");
}

TEST_F(GatewayTest, Chat_ConcatenatesMessageTokensAndAnswersAnAssistantMessage) {
  StartGateway();
  auto r = Post("/v1/chat/completions", R"({"model":"test-model","messages":[
      {"role":"system","content":[1,2]},{"role":"user","content":[3]},
      {"role":"assistant","content":[]},{"role":"user","content":[4,5]}],
      "max_completion_tokens":3})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_THAT(fake().last_request().prompt_tokens(), ::testing::ElementsAre(1, 2, 3, 4, 5));
  const json j = json::parse(r->body);
  EXPECT_THAT(j["id"].get<std::string>(), ::testing::StartsWith("chatcmpl-"));
  EXPECT_EQ(j["object"], "chat.completion");
  const json& msg = j["choices"][0]["message"];
  EXPECT_EQ(msg["role"], "assistant");
  EXPECT_EQ(msg["content"], "");
  EXPECT_EQ(msg["token_ids"].get<std::vector<int32_t>>(), Expected({1, 2, 3, 4, 5}, 3));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
}

// The chat endpoint forwards the seed as the completions endpoint does, whole
// and streamed; an explicit 0 is a seed too; unseeded requests get random ones.
TEST_F(GatewayTest, Chat_ForwardsTheSeedAndDrawsOneWhenAbsent) {
  StartGateway();
  for (const char* stream : {"false", "true"}) {
    for (const char* path : {"/v1/chat/completions", "/v1/completions"}) {
      const bool chat = absl::StrContains(path, "chat");
      const std::string prompt =
          chat ? R"("messages":[{"role":"user","content":[3,4]}])" : R"("prompt":[3,4])";
      for (const uint64_t seed : {uint64_t{7}, uint64_t{0}}) {
        auto r = Post(path, absl::StrCat("{", prompt, R"(,"temperature":1,"max_tokens":2,"seed":)",
                                         seed, R"(,"stream":)", stream, "}"));
        ASSERT_TRUE(r);
        ASSERT_EQ(r->status, 200) << r->body;
        const v1::GenerateRequest seen = fake().last_request();
        EXPECT_TRUE(seen.sampling().has_seed()) << path << " seed " << seed;
        EXPECT_EQ(seen.sampling().seed(), seed) << path << " stream " << stream;
        EXPECT_FLOAT_EQ(seen.sampling().temperature(), 1.0f);
      }
      auto a = Post(path, absl::StrCat("{", prompt, R"(,"stream":)", stream, "}"));
      ASSERT_EQ(a->status, 200) << a->body;
      const v1::GenerateRequest first = fake().last_request();
      auto b = Post(path, absl::StrCat("{", prompt, R"(,"stream":)", stream, "}"));
      ASSERT_EQ(b->status, 200) << b->body;
      EXPECT_TRUE(first.sampling().has_seed()) << path;
      EXPECT_NE(fake().last_request().sampling().seed(), first.sampling().seed()) << path;
    }
  }
}

TEST_F(GatewayTest, Chat_StreamsChunkObjectsWithDeltas) {
  StartGateway();
  auto r = Post("/v1/chat/completions",
                R"({"messages":[{"role":"user","content":[9]}],"max_tokens":2,"stream":true})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const std::vector<std::string> data = SseData(r->body);
  ASSERT_EQ(data.size(), 4u) << r->body;
  const json c0 = json::parse(data[0]), c1 = json::parse(data[1]), last = json::parse(data[2]);
  EXPECT_EQ(c0["object"], "chat.completion.chunk");
  EXPECT_EQ(c0["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(c0["choices"][0]["delta"]["token_ids"], json::array({9}));
  EXPECT_FALSE(c1["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(c1["choices"][0]["delta"]["token_ids"], json::array({10}));
  EXPECT_EQ(last["choices"][0]["delta"], json::object());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(last["usage"]["completion_tokens"], 2);
  EXPECT_EQ(data[3], "[DONE]");
}

TEST_F(GatewayTest, Models_ListsTheServedNameAndUnknownModelsAre404) {
  StartGateway();
  auto r = Get("/v1/models");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200);
  const json j = json::parse(r->body);
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "test-model");
  EXPECT_EQ(j["data"][0]["object"], "model");
  EXPECT_EQ(j["data"][0]["owned_by"], "dmoe");
  auto one = Get("/v1/models/test-model");
  ASSERT_TRUE(one);
  EXPECT_EQ(one->status, 200);
  ExpectError(Get("/v1/models/gpt-4"), 404, "model");
  const json e =
      ExpectError(Post("/v1/completions", R"({"model":"gpt-4","prompt":[1]})"), 404, "model");
  EXPECT_EQ(e["error"]["code"], "model_not_found");
  EXPECT_EQ(fake().generate_calls(), 0);
}

TEST_F(GatewayTest, Health_OkWhileARouterAnswersElse503) {
  StartGateway();
  auto ok = Get("/health");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  EXPECT_EQ(json::parse(ok->body)["status"], "ok");
  EXPECT_EQ(json::parse(ok->body)["routers"], 1);
  EXPECT_EQ(json::parse(ok->body)["routers_total"], 1);

  fake().set_load_fails(true);
  ASSERT_TRUE(WaitFor([&] { return gw_->routers().HealthyCount() == 0; }, absl::Seconds(5)));
  auto down = Get("/health");
  ASSERT_TRUE(down);
  EXPECT_EQ(down->status, 503) << down->body;
  EXPECT_EQ(json::parse(down->body)["routers"], 0);
  // With no healthy router a generation is 503, not a hang.
  ExpectError(Post("/v1/completions", R"({"prompt":[1]})"), 503, "");
}

TEST_F(GatewayTest, Metrics_CountRequestsByEndpointAndCodeAndTokens) {
  StartGateway();
  ASSERT_EQ(Post("/v1/completions", R"({"prompt":[1],"max_tokens":3})")->status, 200);
  ASSERT_EQ(Post("/v1/completions", R"({"prompt":[1],"max_tokens":2,"stream":true})")->status, 200);
  ASSERT_EQ(Post("/v1/completions", "{")->status, 400);
  // A handler records its request after the last byte went out, so a client
  // can see the response a moment before the counters move: scrape until the
  // last request is counted and nothing is in flight.
  std::string m, content_type;
  int status = 0;
  ASSERT_TRUE(WaitFor(
      [&] {
        auto r = Get("/metrics");
        if (!r) return false;
        status = r->status;
        content_type = r->get_header_value("Content-Type");
        m = r->body;
        return m.find("moe_gateway_inflight_requests 0") != std::string::npos &&
               m.find(R"(code="400",endpoint="/v1/completions"})") != std::string::npos;
      },
      absl::Seconds(10)))
      << m;
  ASSERT_EQ(status, 200);
  EXPECT_THAT(content_type, HasSubstr("text/plain"));
  EXPECT_THAT(
      m, HasSubstr(R"(moe_gateway_http_requests_total{code="200",endpoint="/v1/completions"} 2)"));
  EXPECT_THAT(
      m, HasSubstr(R"(moe_gateway_http_requests_total{code="400",endpoint="/v1/completions"} 1)"));
  EXPECT_THAT(m, HasSubstr("moe_gateway_generated_tokens_total 5"));
  EXPECT_THAT(m, HasSubstr("moe_gateway_prompt_tokens_total 2"));
  EXPECT_THAT(
      m, HasSubstr("moe_gateway_request_duration_seconds_bucket{endpoint=\"/v1/completions\""));
  EXPECT_THAT(m, HasSubstr("moe_gateway_inflight_requests 0"));
  EXPECT_THAT(m,
              HasSubstr("moe_gateway_router_healthy{router=\"" + routers_[0]->address() + "\"} 1"));
}

TEST_F(GatewayTest, BadJson_Is400WithAMessage) {
  StartGateway();
  for (const char* body : {"{", "", "[1,2]", "null", "{\"prompt\":[1],}"}) {
    const json e = ExpectError(Post("/v1/completions", body), 400, "");
    EXPECT_EQ(e["error"]["type"], "invalid_request_error") << body;
  }
  const json deep = ExpectError(Post("/v1/completions", std::string(5000, '[')), 400, "");
  EXPECT_THAT(deep["error"]["message"].get<std::string>(), HasSubstr("nests deeper"));
  EXPECT_EQ(fake().generate_calls(), 0);
}

TEST_F(GatewayTest, BadParameters_Are400NamingTheParameter) {
  StartGateway();
  struct Case {
    const char* path;
    const char* body;
    const char* param;
    const char* message;
  };
  const Case cases[] = {
      {"/v1/completions", R"({"prompt":[1],"temperature":-1})", "temperature", "[0, 2]"},
      {"/v1/completions", R"({"prompt":[1],"temperature":"hot"})", "temperature", "a number"},
      {"/v1/completions", R"({"prompt":[1],"top_p":0})", "top_p", "(0, 1]"},
      {"/v1/completions", R"({"prompt":[1],"max_tokens":0})", "max_tokens", "[1, "},
      {"/v1/completions", R"({"prompt":[1],"max_tokens":2.5})", "max_tokens", "an integer"},
      {"/v1/completions", R"({"prompt":"Hello"})", "prompt", "tokenizer"},
      {"/v1/completions", R"({"prompt":["Hello"]})", "prompt", "tokenizer"},
      {"/v1/completions", R"({"prompt":[]})", "prompt", "empty"},
      {"/v1/completions", R"({"prompt":[1,-2]})", "prompt", "prompt[1]"},
      {"/v1/completions", R"({"prompt":[[1],[2]]})", "prompt", "one prompt"},
      {"/v1/completions", R"({"max_tokens":3})", "prompt", "required"},
      {"/v1/completions", R"({"prompt":[1],"stop":"\n"})", "stop", "stop token ids"},
      {"/v1/completions", R"({"prompt":[1],"stream":"yes"})", "stream", "a boolean"},
      {"/v1/completions", R"({"prompt":[1],"seed":1.5})", "seed", "an integer"},
      {"/v1/completions", R"({"prompt":[1],"n":2})", "n", "n=1"},
      {"/v1/completions", R"({"prompt":[1],"model":7})", "model", "a string"},
      {"/v1/chat/completions", R"({"messages":[{"role":"user","content":"hi"}]})",
       "messages[0].content", "tokenizer"},
      {"/v1/chat/completions",
       R"({"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]})",
       "messages[0].content", "tokenizer"},
      {"/v1/chat/completions", R"({"messages":[{"role":"user","content":[{"type":"text"}]}]})",
       "messages[0].content", "text must be a string"},
      {"/v1/chat/completions", R"({"messages":[{"role":"wizard","content":[1]}]})",
       "messages[0].role", "one of"},
      {"/v1/chat/completions", R"({"messages":[]})", "messages", "empty"},
      {"/v1/chat/completions", R"({"messages":[{"role":"user","content":[1]}],"top_p":1.5})",
       "top_p", "(0, 1]"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body);
    const json e = ExpectError(Post(c.path, c.body), 400, c.param);
    if (e.contains("error")) {
      EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr(c.message));
    }
  }
  EXPECT_EQ(fake().generate_calls(), 0);
}

TEST_F(GatewayTest, WrongMethodUnknownRouteAndOversizedBody) {
  StartGateway();
  auto m = Get("/v1/completions");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 405);
  ExpectError(Get("/v2/whatever"), 404, "");
  const std::string big =
      absl::StrCat(R"({"prompt":[1],"user":")", std::string(70 << 10, 'x'), R"("})");
  ExpectError(Post("/v1/completions", big), 413, "");
}

// Sends `request` on a new loopback connection to `port`, shuts the sending
// side when `half_close`, and returns everything the gateway writes back until
// it closes the connection (or `read_timeout_s` passes).
std::string RawSend(int port, const std::string& request, bool half_close, int read_timeout_s) {
  dmoe::testing::LoopbackClient c(port);
  if (!c.connected() || !c.Send(request)) return "";
  if (half_close) c.ShutdownWrite();
  return c.ReadToClose(absl::Seconds(read_timeout_s));
}

std::string RawExchange(int port, const std::string& request) {
  return RawSend(port, request, /*half_close=*/false, 5);
}

// RawExchange with a half-close: the request, then shutdown(SHUT_WR), as
// `nc -N` and some proxies do; returns what comes back and the time it took.
std::string RawHalfClose(int port, const std::string& request, absl::Duration* took) {
  const absl::Time t0 = absl::Now();
  std::string got = RawSend(port, request, /*half_close=*/true, 8);
  *took = absl::Now() - t0;
  return got;
}

int CountOccurrences(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

// Issue 13.1: of three pipelined requests only the first was answered and the
// connection idled 5 s.
TEST_F(GatewayTest, PipelinedRequests_AreAllAnswered) {
  StartGateway();
  const absl::Time t0 = absl::Now();
  const std::string got =
      RawExchange(gw_->http_port(),
                  "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                  "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Content-Length: 30\r\n\r\n{\"prompt\":[1],\"max_tokens\":2}\n"  // 29 + LF
                  "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_LT(absl::Now() - t0, absl::Seconds(3));
  EXPECT_EQ(CountOccurrences(got, "HTTP/1.1 200 OK"), 3) << got;
  EXPECT_THAT(got, HasSubstr("\"completion_tokens\":2"));
  EXPECT_EQ(fake().generate_calls(), 1);
}

// Issue 13.2: a client that half-closed after its request got 0 bytes.
TEST_F(GatewayTest, HalfClosedClient_GetsItsAnswerOnEveryRoute) {
  StartGateway();
  const auto post = [](const std::string& body) {
    return absl::StrCat(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: ",
        body.size(), "\r\n\r\n", body);
  };
  const std::pair<std::string, std::string> cases[] = {
      {"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"},
      {"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"},
      {post(R"({"prompt":[1],"max_tokens":2})"), "HTTP/1.1 200 OK"},
      {post(R"({"prompt":[1],"max_tokens":2,"stream":true})"), "data: [DONE]"},
      {post(R"({"prompt":"a"})"), "HTTP/1.1 400 Bad Request"},
  };
  for (const auto& [req, expect] : cases) {
    SCOPED_TRACE(req);
    absl::Duration took;
    const std::string got = RawHalfClose(gw_->http_port(), req, &took);
    EXPECT_THAT(got, HasSubstr(expect));
    EXPECT_LT(took, absl::Seconds(3));
  }
}

// Issues 13.4 and 13.6: malformed framing and unreadable requests are refused
// with a JSON error and the connection closes at once (not after 5 s idle).
TEST_F(GatewayTest, MalformedRequests_AreRefusedWithJsonAndClosedAtOnce) {
  StartGateway();
  const std::pair<std::string, std::string> cases[] = {
      {"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 30\r\n"
       "\r\n{}",
       "HTTP/1.1 400 "},
      {"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
       "HTTP/1.1 400 "},
      {"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", "HTTP/1.1 400 "},
      {"garbage\r\n\r\n", "HTTP/1.1 400 "},
      {"GET /health\r\n\r\n", "HTTP/1.1 400 "},
      {"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/1.1 505 "},
      {"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 501 "},
      {"GET /health HTTP/1.1\r\nHost: x\r\nX: " + std::string(100 << 10, 'a') + "\r\n\r\n",
       "HTTP/1.1 431 "},
  };
  for (const auto& [req, status] : cases) {
    SCOPED_TRACE(req.substr(0, 80));
    const absl::Time t0 = absl::Now();
    const std::string got = RawExchange(gw_->http_port(), req);
    EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
    EXPECT_TRUE(absl::StartsWith(got, status)) << got.substr(0, 300);
    EXPECT_THAT(got, HasSubstr("Connection: close\r\n"));
    const size_t body = got.find("\r\n\r\n");
    ASSERT_NE(body, std::string::npos);
    const json e = json::parse(got.substr(body + 4), nullptr, false);
    ASSERT_TRUE(e.contains("error")) << got;
    EXPECT_FALSE(e["error"]["message"].get<std::string>().empty());
  }
  EXPECT_EQ(fake().generate_calls(), 0);
}

// Issue 13.7: DELETE and OPTIONS (and PUT, PATCH, TRACE) on a known path were
// 404 "no route" while GET was 405. Every method a path does not take is now
// 405 with Allow and the JSON error, on every known path.
TEST_F(GatewayTest, WrongMethodOnEveryKnownPath_Is405WithAllowAndAJsonError) {
  StartGateway();
  httplib::Client c("127.0.0.1", gw_->http_port());
  c.set_read_timeout(30, 0);
  const std::string post_only[] = {"/v1/completions", "/v1/chat/completions", "/tokenize",
                                   "/detokenize"};
  const std::string get_only[] = {"/v1/models", "/v1/models/test-model", "/health", "/metrics"};
  auto expect_405 = [&](const httplib::Result& r, const std::string& method,
                        const std::string& path, const std::string& allow) {
    SCOPED_TRACE(method + " " + path);
    const json e = ExpectError(r, 405, "");
    if (!r) return;
    EXPECT_EQ(r->get_header_value("Allow"), allow);
    if (!e.contains("error")) return;
    EXPECT_EQ(e["error"]["code"], "method_not_allowed");
    EXPECT_EQ(e["error"]["type"], "invalid_request_error");
    EXPECT_THAT(e["error"]["message"].get<std::string>(),
                HasSubstr(absl::StrCat(path, " takes ", allow, ", not ", method)));
  };
  for (const std::string& p : post_only) {
    expect_405(c.Get(p.c_str()), "GET", p, "POST");
    expect_405(c.Delete(p.c_str()), "DELETE", p, "POST");
    expect_405(c.Options(p.c_str()), "OPTIONS", p, "POST");
    expect_405(c.Put(p.c_str(), "{}", "application/json"), "PUT", p, "POST");
    expect_405(c.Patch(p.c_str(), "{}", "application/json"), "PATCH", p, "POST");
    auto head = c.Head(p.c_str());
    ASSERT_TRUE(head);
    EXPECT_EQ(head->status, 405);
    EXPECT_EQ(head->get_header_value("Allow"), "POST");
  }
  for (const std::string& p : get_only) {
    expect_405(c.Post(p.c_str(), "{}", "application/json"), "POST", p, "GET, HEAD");
    expect_405(c.Delete(p.c_str()), "DELETE", p, "GET, HEAD");
    expect_405(c.Options(p.c_str()), "OPTIONS", p, "GET, HEAD");
    expect_405(c.Put(p.c_str(), "{}", "application/json"), "PUT", p, "GET, HEAD");
    expect_405(c.Patch(p.c_str(), "{}", "application/json"), "PATCH", p, "GET, HEAD");
  }
  // A DELETE with a body on a kept-alive connection: the body is consumed,
  // so the next request on the connection is answered normally.
  expect_405(c.Delete("/v1/completions", R"({"prompt":[1]})", "application/json"), "DELETE",
             "/v1/completions", "POST");
  auto ok = c.Post("/v1/completions", R"({"prompt":[1],"max_tokens":1})", "application/json");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  // TRACE (which cpp-httplib does not route at all) is a wrong method too.
  const std::string trace = RawExchange(
      gw_->http_port(), "TRACE /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_THAT(trace, HasSubstr("HTTP/1.1 405 Method Not Allowed\r\n"));
  EXPECT_THAT(trace, HasSubstr("Allow: POST\r\n"));
  EXPECT_THAT(trace, HasSubstr("method_not_allowed"));
  // Unknown paths stay 404, whatever the method; allowed methods still work.
  ExpectError(c.Delete("/v2/whatever"), 404, "");
  ExpectError(c.Options("/v1/models/"), 404, "");
  auto models = c.Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(models->status, 200);
  auto health = c.Head("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  EXPECT_EQ(fake().generate_calls(), 1);
}

// Issue 13.5: add_special_tokens with a token-id prompt was not checked at all.
TEST_F(GatewayTest, BooleanFieldsOfAnyOtherType_Are400WhateverThePrompt) {
  StartGateway();
  for (const char* value : {"[]", "{}", "1.5"}) {
    for (const char* field : {"add_special_tokens", "add_generation_prompt", "stream"}) {
      SCOPED_TRACE(absl::StrCat(field, ": ", value));
      const std::string extra = absl::StrCat(R"(,")", field, R"(":)", value, "}");
      const json e =
          ExpectError(Post("/v1/completions", absl::StrCat(R"({"prompt":[1])", extra)), 400, field);
      if (e.contains("error")) {
        EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("must be a boolean"));
      }
      ExpectError(Post("/v1/chat/completions",
                       absl::StrCat(R"({"messages":[{"role":"user","content":[1]}])", extra)),
                  400, field);
    }
  }
  EXPECT_EQ(fake().generate_calls(), 0);
}

TEST_F(GatewayTest, RouterOverloaded_Is429ForPlainAndStreamingRequests) {
  StartGateway();
  fake().set_fail_code(grpc::StatusCode::RESOURCE_EXHAUSTED);
  const json e = ExpectError(Post("/v1/completions", R"({"prompt":[1]})"), 429, "");
  EXPECT_EQ(e["error"]["type"], "rate_limit_error");
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("fake router failure"));
  ExpectError(Post("/v1/completions", R"({"prompt":[1],"stream":true})"), 429, "");
}

TEST_F(GatewayTest, RouterErrors_Are502Or503WithTheRoutersMessage) {
  StartGateway();
  fake().set_fail_code(grpc::StatusCode::INTERNAL);
  const json e = ExpectError(Post("/v1/completions", R"({"prompt":[1]})"), 502, "");
  EXPECT_THAT(e["error"]["message"].get<std::string>(),
              HasSubstr(routers_[0]->address() + ": fake router failure"));
  fake().set_fail_code(grpc::StatusCode::INVALID_ARGUMENT);
  ExpectError(Post("/v1/chat/completions", R"({"messages":[{"role":"user","content":[1]}]})"), 400,
              "");
  fake().set_fail_code(grpc::StatusCode::UNAVAILABLE);
  ExpectError(Post("/v1/completions", R"({"prompt":[1]})"), 503, "");
}

TEST_F(GatewayTest, GatewayAtCapacity_Is429) {
  StartGateway(/*max_inflight=*/1);
  fake().set_token_delay(absl::Milliseconds(20));
  std::thread slow([&] { Post("/v1/completions", R"({"prompt":[1],"max_tokens":50})"); });
  ASSERT_TRUE(WaitFor([&] { return fake().active() == 1; }, absl::Seconds(5)));
  const json e = ExpectError(Post("/v1/completions", R"({"prompt":[1]})"), 429, "");
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("--max-inflight"));
  slow.join();
  EXPECT_EQ(fake().generate_calls(), 1);
}

// Sends a streaming request on a raw socket, reads until the first token's
// event, then closes the connection mid-stream.
void OpenStreamAndHangUp(int port, const std::string& body) {
  dmoe::testing::LoopbackClient c(port);
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.Send(
      absl::StrCat("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   "Content-Length: ",
                   body.size(), "\r\n\r\n", body)));
  const std::string got = c.ReadUntil("data: ", absl::Seconds(30));
  ASSERT_THAT(got, HasSubstr("data: "));
  EXPECT_THAT(got, HasSubstr("200 OK"));
}

TEST_F(GatewayTest, ClientDisconnectMidStream_CancelsTheRouterCallWithinASecond) {
  StartGateway();
  fake().set_token_delay(absl::Milliseconds(100));
  OpenStreamAndHangUp(gw_->http_port(), R"({"prompt":[1],"max_tokens":1000,"stream":true})");
  const absl::Time closed = absl::Now();
  ASSERT_TRUE(WaitFor([&] { return fake().cancellations() == 1; }, absl::Seconds(5)));
  EXPECT_LT(fake().last_cancel_time() - closed, absl::Seconds(1));
  EXPECT_TRUE(WaitFor(
      [&] {
        return absl::StrContains(Get("/metrics")->body, "moe_gateway_client_disconnects_total 1");
      },
      absl::Seconds(5)));
}

TEST_F(GatewayTest, ClientDisconnectBetweenTokens_IsSeenWithoutWaitingForTheNextToken) {
  StartGateway();
  // Tokens every 600 ms: after the hang-up the next write is 600 ms away, so a
  // faster cancellation comes from the gateway's check of the idle socket.
  fake().set_token_delay(absl::Milliseconds(600));
  OpenStreamAndHangUp(gw_->http_port(), R"({"prompt":[1],"max_tokens":5,"stream":true})");
  const absl::Time closed = absl::Now();
  ASSERT_TRUE(WaitFor([&] { return fake().cancellations() == 1; }, absl::Seconds(5)));
  EXPECT_LT(fake().last_cancel_time() - closed, absl::Milliseconds(450));
}

TEST_F(GatewayTest, TwoRouters_RequestsGoToTheLessLoadedOne) {
  routers_.push_back(std::make_unique<FakeRouterServer>());
  fake(0).set_reported_load(10);
  fake(1).set_reported_load(0);
  StartGateway();
  for (int i = 0; i < 4; ++i) {
    ASSERT_EQ(Post("/v1/completions", R"({"prompt":[1],"max_tokens":1})")->status, 200);
  }
  EXPECT_EQ(fake(0).generate_calls(), 0);
  EXPECT_EQ(fake(1).generate_calls(), 4);

  fake(0).set_reported_load(0);
  fake(1).set_reported_load(7);
  gw_->routers().PollNow();
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(Post("/v1/completions", R"({"prompt":[1],"max_tokens":1})")->status, 200);
  }
  EXPECT_EQ(fake(0).generate_calls(), 3);
  EXPECT_EQ(fake(1).generate_calls(), 4);
}

TEST_F(GatewayTest, TwoRouters_EqualLoadGoesToTheOneWithFewerOfOurRequests) {
  routers_.push_back(std::make_unique<FakeRouterServer>());
  StartGateway();
  fake(0).set_token_delay(absl::Milliseconds(20));
  fake(1).set_token_delay(absl::Milliseconds(20));
  std::thread held([&] { Post("/v1/completions", R"({"prompt":[1],"max_tokens":40})"); });
  ASSERT_TRUE(WaitFor([&] { return fake(0).active() + fake(1).active() == 1; }, absl::Seconds(5)));
  const int busy = fake(0).active() == 1 ? 0 : 1;
  ASSERT_EQ(Post("/v1/completions", R"({"prompt":[1],"max_tokens":1})")->status, 200);
  EXPECT_EQ(fake(1 - busy).generate_calls(), 1);
  EXPECT_EQ(fake(busy).generate_calls(), 1);
  held.join();
}

TEST_F(GatewayTest, UnavailableRouter_FailsOverBeforeTheFirstToken) {
  routers_.push_back(std::make_unique<FakeRouterServer>());
  fake(0).set_reported_load(0);
  fake(1).set_reported_load(5);
  fake(0).set_fail_code(grpc::StatusCode::UNAVAILABLE);
  StartGateway();
  auto r = Post("/v1/completions", R"({"prompt":[2],"max_tokens":2})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(fake(0).generate_calls(), 1);
  EXPECT_EQ(fake(1).generate_calls(), 1);
}

TEST_F(GatewayTest, DeadRouterAddress_IsSkipped) {
  StartGateway(16, {"127.0.0.1:1"});
  EXPECT_EQ(gw_->routers().HealthyCount(), 1);
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(Post("/v1/completions", R"({"prompt":[1],"max_tokens":1})")->status, 200);
  }
  EXPECT_EQ(fake().generate_calls(), 3);
}

TEST_F(GatewayTest, Grpc_GenerateIsPassedThrough) {
  StartGateway();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", gw_->grpc_port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::RouterService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GenerateRequest req;
  req.add_prompt_tokens(4);
  req.add_prompt_tokens(6);
  req.set_max_tokens(3);
  auto reader = stub->Generate(&ctx, req);
  std::vector<int32_t> tokens;
  v1::GenerateResponse m;
  std::string finish;
  while (reader->Read(&m)) {
    tokens.push_back(m.token());
    finish = m.finish_reason();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, Expected({4, 6}, 3));
  EXPECT_EQ(finish, "length");

  grpc::ClientContext load_ctx;
  v1::RouterLoadResponse load;
  EXPECT_TRUE(stub->GetLoad(&load_ctx, v1::RouterLoadRequest(), &load).ok());
}

// The pass-through forwards sampling as sent: a seed (0 included) reaches the
// router, and an absent one stays absent (the router then draws one).
TEST_F(GatewayTest, Grpc_SeedIsPassedThroughAsSent) {
  StartGateway();
  auto stub = v1::RouterService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", gw_->grpc_port()), grpc::InsecureChannelCredentials()));
  auto generate = [&](std::optional<uint64_t> seed) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::GenerateRequest req;
    req.add_prompt_tokens(4);
    req.set_max_tokens(2);
    req.mutable_sampling()->set_temperature(1.0f);
    if (seed.has_value()) req.mutable_sampling()->set_seed(*seed);
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    EXPECT_TRUE(reader->Finish().ok());
    return fake().last_request().sampling();
  };
  const v1::SamplingOptions seven = generate(7);
  EXPECT_TRUE(seven.has_seed());
  EXPECT_EQ(seven.seed(), 7u);
  const v1::SamplingOptions zero = generate(0);
  EXPECT_TRUE(zero.has_seed());
  EXPECT_EQ(zero.seed(), 0u);
  EXPECT_FALSE(generate(std::nullopt).has_seed());
}

TEST_F(GatewayTest, Grpc_ClientCancelCancelsTheRouterCall) {
  StartGateway();
  fake().set_token_delay(absl::Milliseconds(50));
  auto stub = v1::RouterService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", gw_->grpc_port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::GenerateRequest req;
  req.add_prompt_tokens(1);
  req.set_max_tokens(1000);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  ctx.TryCancel();
  const absl::Time cancelled = absl::Now();
  ASSERT_TRUE(WaitFor([&] { return fake().cancellations() == 1; }, absl::Seconds(5)));
  EXPECT_LT(fake().last_cancel_time() - cancelled, absl::Seconds(1));
  reader->Finish();
}

TEST_F(GatewayTest, Shutdown_CancelsStreamsInFlightAfterTheGrace) {
  StartGateway();
  fake().set_token_delay(absl::Milliseconds(50));
  std::thread client([&] {
    auto r = Post("/v1/completions", R"({"prompt":[1],"max_tokens":1000,"stream":true})");
    ASSERT_TRUE(r);
    EXPECT_THAT(r->body, HasSubstr("\"error\""));
    EXPECT_THAT(r->body, HasSubstr("[DONE]"));
  });
  ASSERT_TRUE(WaitFor([&] { return fake().active() == 1; }, absl::Seconds(5)));
  absl::SleepFor(absl::Milliseconds(100));
  const absl::Time start = absl::Now();
  gw_->Shutdown(absl::Milliseconds(100));
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  client.join();
  EXPECT_TRUE(WaitFor([&] { return fake().cancellations() == 1; }, absl::Seconds(2)));
}

}  // namespace
}  // namespace dmoe::gateway

namespace dmoe::gateway {
namespace {

TEST_F(GatewayTextTest, Completion_TextPromptIsEncodedAndTheAnswerCarriesText) {
  StartGateway();
  auto r = Post("/v1/completions", R"({"prompt":"Hi","max_tokens":4,"temperature":0})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(Seen(), Encode("Hi", true));  // BOS added: add_bos_token
  EXPECT_EQ(Seen(), (std::vector<int32_t>{1000, 'H', 'i'}));
  const json j = json::parse(r->body);
  const std::vector<int32_t> tokens = Expected(Seen(), 4);
  EXPECT_EQ(j["choices"][0]["token_ids"].get<std::vector<int32_t>>(), tokens);
  EXPECT_EQ(j["choices"][0]["text"], *tokenizer_->Decode(tokens, /*skip_special_tokens=*/true));
  EXPECT_EQ(j["usage"]["prompt_tokens"], 3);
  EXPECT_EQ(j["usage"]["completion_tokens"], 4);

  // ["text"] and add_special_tokens: false; token-id prompts still work, with text.
  auto r2 = Post("/v1/completions", R"({"prompt":["Hi"],"add_special_tokens":false})");
  ASSERT_EQ(r2->status, 200) << r2->body;
  EXPECT_EQ(Seen(), (std::vector<int32_t>{'H', 'i'}));
  auto r3 = Post("/v1/completions", R"({"prompt":[300],"max_tokens":3})");
  ASSERT_EQ(r3->status, 200) << r3->body;
  EXPECT_EQ(json::parse(r3->body)["choices"][0]["text"], "w300w301w302");
}

TEST_F(GatewayTextTest, Completion_StreamedTextNeverSplitsACharacter) {
  StartGateway();
  // Tokens 500..504: "你" and "😀" each split across two byte-level tokens.
  auto r = Post("/v1/completions", R"({"prompt":[500],"max_tokens":5,"stream":true})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  std::vector<std::string> pieces;
  json last;
  EXPECT_EQ(StreamText(r->body, false, &pieces, &last), "你!😀w504");
  EXPECT_THAT(pieces, ::testing::ElementsAre("", "你!", "", "😀", "w504", ""));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(last["usage"]["completion_tokens"], 5);
  EXPECT_EQ(last["usage"]["prompt_tokens"], 1);
}

TEST_F(GatewayTextTest, Chat_TextMessagesAreRenderedWithTheChatTemplate) {
  StartGateway();
  auto r = Post("/v1/chat/completions", R"({"messages":[{"role":"system","content":"S"},
      {"role":"user","content":"Hi"}],"max_tokens":3})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  // The template adds BOS itself; encoding adds nothing more.
  EXPECT_EQ(Seen(), Encode("<s>S\n<|user|>Hi<|assistant|>", false));
  EXPECT_EQ(Seen(), (std::vector<int32_t>{1000, 'S', '\n', 1002, 'H', 'i', 1003}));
  const json j = json::parse(r->body);
  const std::vector<int32_t> tokens = Expected(Seen(), 3);
  EXPECT_EQ(j["choices"][0]["message"]["content"], *tokenizer_->Decode(tokens, true));
  EXPECT_EQ(j["choices"][0]["message"]["token_ids"].get<std::vector<int32_t>>(), tokens);

  // Content parts are joined with "\n"; add_generation_prompt: false.
  auto r2 = Post("/v1/chat/completions", R"({"messages":[{"role":"user","content":
      [{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"add_generation_prompt":false})");
  ASSERT_EQ(r2->status, 200) << r2->body;
  EXPECT_EQ(Seen(), Encode("<s><|user|>a\nb", false));
}

TEST_F(GatewayTextTest, Chat_StreamsTextDeltas) {
  StartGateway();
  auto r = Post("/v1/chat/completions",
                R"({"messages":[{"role":"user","content":[500]}],"max_tokens":4,"stream":true})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  std::vector<std::string> pieces;
  EXPECT_EQ(StreamText(r->body, true, &pieces), "你!😀");
  const json first = json::parse(SseData(r->body)[0]);
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
}

TEST_F(GatewayTextTest, StopStrings_CutTheTextAndCancelUpstream) {
  StartGateway();
  fake().set_token_delay(absl::Milliseconds(20));
  // "w300w301w302...": "1w30" first appears across tokens 301 and 302.
  auto r = Post("/v1/completions", R"({"prompt":[300],"max_tokens":100,"stop":["zzz","1w30"]})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  EXPECT_EQ(j["choices"][0]["text"], "w300w30");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  EXPECT_TRUE(WaitFor([&] { return fake().cancellations() == 1; }, absl::Seconds(5)));

  auto s =
      Post("/v1/completions", R"({"prompt":[300],"max_tokens":100,"stop":"1w30","stream":true})");
  ASSERT_TRUE(s);
  ASSERT_EQ(s->status, 200) << s->body;
  std::vector<std::string> pieces;
  json last;
  EXPECT_EQ(StreamText(s->body, false, &pieces, &last), "w300w30");
  EXPECT_THAT(pieces, ::testing::ElementsAre("w300", "w30", "", ""));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(last["usage"]["completion_tokens"], 3);
  EXPECT_TRUE(WaitFor([&] { return fake().cancellations() == 2; }, absl::Seconds(5)));
}

TEST_F(GatewayTextTest, StopStrings_HeldBackTextIsSentAtTheEnd) {
  StartGateway();
  auto r =
      Post("/v1/completions", R"({"prompt":[300],"max_tokens":2,"stop":["1w"],"stream":true})");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  std::vector<std::string> pieces;
  json last;
  EXPECT_EQ(StreamText(r->body, false, &pieces, &last), "w300w301");
  EXPECT_THAT(pieces, ::testing::ElementsAre("w300", "w30", "1"));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
}

TEST_F(GatewayTextTest, TokenizeAndDetokenize) {
  StartGateway();
  auto t = Post("/tokenize", R"({"prompt":"Hi"})");
  ASSERT_TRUE(t);
  ASSERT_EQ(t->status, 200) << t->body;
  EXPECT_EQ(json::parse(t->body), json::parse(R"({"count":3,"tokens":[1000,72,105]})"));
  auto t2 = Post("/tokenize", R"({"prompt":"Hi","add_special_tokens":false})");
  EXPECT_EQ(json::parse(t2->body)["tokens"], json::array({72, 105}));
  auto t3 = Post("/tokenize", R"({"messages":[{"role":"user","content":"x"}]})");
  ASSERT_EQ(t3->status, 200) << t3->body;
  EXPECT_EQ(json::parse(t3->body)["tokens"], json::array({1000, 1002, 'x', 1003}));

  auto d = Post("/detokenize", R"({"tokens":[1000,72,105,500,501]})");
  ASSERT_EQ(d->status, 200) << d->body;
  EXPECT_EQ(json::parse(d->body)["prompt"], "<s>Hi你!");
  auto d2 = Post("/detokenize", R"({"tokens":[1000,72],"skip_special_tokens":true})");
  EXPECT_EQ(json::parse(d2->body)["prompt"], "H");
  const json e = ExpectError(Post("/detokenize", R"({"tokens":[5000]})"), 400, "tokens");
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("5000"));
  ExpectError(Post("/detokenize", R"({"tokens":"x"})"), 400, "tokens");
  // skip_special_tokens is checked as every boolean is: null is the default,
  // another type is named.
  auto d3 = Post("/detokenize", R"({"tokens":[1000,72],"skip_special_tokens":null})");
  ASSERT_EQ(d3->status, 200) << d3->body;
  EXPECT_EQ(json::parse(d3->body)["prompt"], "<s>H");
  const json skip = ExpectError(Post("/detokenize", R"({"tokens":[72],"skip_special_tokens":1.5})"),
                                400, "skip_special_tokens");
  EXPECT_THAT(skip["error"]["message"].get<std::string>(),
              HasSubstr("skip_special_tokens must be a boolean, got number"));
  ExpectError(Post("/tokenize", R"({"prompt":7})"), 400, "prompt");
  EXPECT_EQ(fake().generate_calls(), 0);
}

TEST_F(GatewayTextTest, TextErrors) {
  StartGateway();
  ExpectError(Post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"a"},
      {"role":"user","content":[1]}]})"),
              400, "messages");
  const json raised = ExpectError(
      Post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"raise"}]})"), 400,
      "messages");
  EXPECT_THAT(raised["error"]["message"].get<std::string>(), HasSubstr("no raising"));
  ExpectError(Post("/v1/completions", R"({"prompt":[1],"stop":["a",1]})"), 400, "stop");
  ExpectError(Post("/v1/completions", R"({"prompt":[1],"stop":[""]})"), 400, "stop");
  ExpectError(Post("/v1/completions", R"({"prompt":"","add_special_tokens":false})"), 400,
              "prompt");
  ExpectError(Post("/v1/chat/completions", R"({"messages":[{"role":"user","content":
      [{"type":"image_url","image_url":{"url":"x"}}]}]})"),
              400, "messages[0].content");
  EXPECT_EQ(fake().generate_calls(), 0);
}

TEST_F(GatewayTest, TokenizeWithoutATokenizerIs501) {
  StartGateway();
  const json e = ExpectError(Post("/tokenize", R"({"prompt":"Hi"})"), 501, "");
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("--tokenizer"));
  ExpectError(Post("/detokenize", R"({"tokens":[1]})"), 501, "");
}

}  // namespace
}  // namespace dmoe::gateway
