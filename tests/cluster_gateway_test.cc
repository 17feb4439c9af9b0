// The whole public path as real processes on loopback: dmoe-gateway (OpenAI
// HTTP) -> dmoe-router -> 3 dmoe-expert servers, in exact mode (f32 compute and
// f32 activations on the wire), checked against the one-process model.
//
// The gateway has no logprobs (refused unless off), so the greedy tokens are
// what is compared: through /v1/completions and /v1/chat/completions, each
// whole and streamed (SSE), for shared experts on the expert servers and on the
// router, and with replicated experts.
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cluster_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using json = nlohmann::json;
using testing::Cluster;
using testing::HttpResponse;
using testing::LocalGreedy;

constexpr int kMaxTokens = 8;

// Prompts of a few lengths, the first one as in cluster_test.
const std::vector<std::vector<int32_t>> kPrompts = {
    {5, 17, 3, 99, 250, 7, 42, 11}, {1}, {300, 2, 77, 400, 12}};

// The `data:` payloads of an SSE body, in order.
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(pos, end - pos);
    pos = end + 2;
    if (event.empty()) continue;
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    out.push_back(event.substr(6));
  }
  return out;
}

// Greedy, no EOS stop, exactly kMaxTokens: the request fields both APIs share.
json GreedyRequest(bool stream) {
  return {{"max_tokens", kMaxTokens}, {"temperature", 0}, {"ignore_eos", true}, {"stream", stream}};
}

// The tokens of a whole (non-streamed) answer; `where` names the request.
std::vector<int32_t> WholeTokens(const HttpResponse& r, bool chat, const std::string& where) {
  EXPECT_EQ(r.status, 200) << where << ": " << r.body;
  // Non-const: operator[] on a missing key then gives null instead of undefined behaviour.
  json j = json::parse(r.body, nullptr, /*allow_exceptions=*/false);
  if (r.status != 200 || j.is_discarded() || j["choices"].size() != 1) {
    ADD_FAILURE() << where << ": unexpected answer " << r.body;
    return {};
  }
  json& choice = j["choices"][0];
  EXPECT_EQ(choice["finish_reason"], "length") << where;
  EXPECT_EQ(j["usage"]["completion_tokens"], kMaxTokens) << where;
  return (chat ? choice["message"]["token_ids"] : choice["token_ids"]).get<std::vector<int32_t>>();
}

// The tokens of an SSE answer: one per chunk, then a chunk with the finish
// reason and no token, then [DONE].
std::vector<int32_t> StreamedTokens(const HttpResponse& r, bool chat, const std::string& where) {
  EXPECT_EQ(r.status, 200) << where << ": " << r.body;
  const std::vector<std::string> data = SseData(r.body);
  if (r.status != 200 || data.size() < 2 || data.back() != "[DONE]") {
    ADD_FAILURE() << where << ": unexpected stream " << r.body;
    return {};
  }
  std::vector<int32_t> tokens;
  for (size_t i = 0; i + 1 < data.size(); ++i) {
    json j = json::parse(data[i], nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("choices") || j["choices"].size() != 1) {
      ADD_FAILURE() << where << ": chunk " << i << " is " << data[i];
      return {};
    }
    json& choice = j["choices"][0];
    const json ids = (chat ? choice["delta"] : choice)["token_ids"];
    const bool last = i + 2 == data.size();
    if (last) {
      EXPECT_EQ(choice["finish_reason"], "length") << where << ": " << data[i];
      EXPECT_TRUE(ids.is_null() || ids.empty()) << where << ": " << data[i];
    } else {
      EXPECT_TRUE(choice["finish_reason"].is_null()) << where << ": " << data[i];
      EXPECT_EQ(ids.size(), 1u) << where << ": " << data[i];
      for (const json& id : ids) tokens.push_back(id.get<int32_t>());
    }
  }
  return tokens;
}

void ExpectGatewayEqualsOneProcess(const std::string& preset,
                                   const std::vector<std::string>& router_extra,
                                   const std::string& placement_json = "") {
  const std::string model = testing::MakeModel(preset, 31);
  const std::string dir = testing::FreshDir("cluster");
  std::string placement;
  if (!placement_json.empty()) {
    placement = dir + "/placement.json";
    std::ofstream(placement) << placement_json;
  }
  std::vector<std::string> router_flags = {"--wire-dtype", "f32"};
  router_flags.insert(router_flags.end(), router_extra.begin(), router_extra.end());
  Cluster c;
  ASSERT_TRUE(c.Start(model, 3, dir, router_flags, placement));
  ASSERT_TRUE(c.StartGateway());

  for (const std::vector<int32_t>& prompt : kPrompts) {
    const std::vector<int32_t> want = LocalGreedy(model, prompt, kMaxTokens);
    ASSERT_EQ(want.size(), static_cast<size_t>(kMaxTokens));
    const std::string p = json(prompt).dump();
    for (const bool stream : {false, true}) {
      const std::string mode = stream ? " (stream)" : "";
      json completion = GreedyRequest(stream);
      completion["prompt"] = prompt;
      const HttpResponse r = c.HttpPost("/v1/completions", completion.dump());
      const std::string where = "completions " + p + mode;
      EXPECT_EQ(stream ? StreamedTokens(r, false, where) : WholeTokens(r, false, where), want)
          << where << "\nrouter log:\n" << c.router().Log();

      // The chat contents are concatenated with nothing added: the prompt split
      // over two messages is the same sequence.
      json chat = GreedyRequest(stream);
      const size_t half = prompt.size() / 2;
      chat["messages"] = json::array(
          {{{"role", "system"},
            {"content", std::vector<int32_t>(prompt.begin(), prompt.begin() + half)}},
           {{"role", "user"}, {"content", std::vector<int32_t>(prompt.begin() + half, prompt.end())}}});
      const HttpResponse rc = c.HttpPost("/v1/chat/completions", chat.dump());
      const std::string chat_where = "chat " + p + mode;
      EXPECT_EQ(stream ? StreamedTokens(rc, true, chat_where) : WholeTokens(rc, true, chat_where),
                want)
          << chat_where;
    }
  }

  EXPECT_EQ(c.gateway().Kill(SIGTERM), 0) << c.gateway().Log();
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(c.expert(i).Kill(SIGTERM), 0) << c.expert(i).Log();
}

TEST(ClusterGateway, ExactModeEqualsOneProcess_SharedOnExperts) {
  ExpectGatewayEqualsOneProcess("tiny-v3", {});
}

TEST(ClusterGateway, ExactModeEqualsOneProcess_SharedOnRouter) {
  ExpectGatewayEqualsOneProcess("tiny-v2lite", {"--shared-expert", "router"});
}

TEST(ClusterGateway, ExactModeEqualsOneProcess_WithReplicas) {
  // tiny-v3: 16 experts, MoE layers 1 and 2; experts 0-3 on every server.
  const std::string layer = R"([[0,1,2,3,4,5], [0,1,2,3,6,7,8,9,10], [0,1,2,3,11,12,13,14,15]])";
  ExpectGatewayEqualsOneProcess(
      "tiny-v3", {},
      std::string(R"({"version": 1, "num_servers": 3, "layers": [{"layer": 1, "servers": )") +
          layer + R"(}, {"layer": 2, "servers": )" + layer + "}]}");
}

}  // namespace
}  // namespace dmoe
