// The whole public path as real processes on loopback: dmoe-gateway (OpenAI
// HTTP) -> dmoe-router -> 3 dmoe-expert servers, in exact mode (f32 compute and
// f32 activations on the wire), checked against the one-process model.
//
// The gateway has no logprobs (refused unless off), so the greedy tokens are
// what is compared: through /v1/completions and /v1/chat/completions, each
// whole and streamed (SSE), for shared experts on the expert servers and on the
// router, and with replicated experts.
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cluster_util.h"
#include "tests/test_util.h"
#include "tools/generated_tokenizer.h"
#include "tools/make_model.h"

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
          << where << "\nrouter log:\n"
          << c.router().Log();

      // The chat contents are concatenated with nothing added: the prompt split
      // over two messages is the same sequence.
      json chat = GreedyRequest(stream);
      const size_t half = prompt.size() / 2;
      chat["messages"] =
          json::array({{{"role", "system"},
                        {"content", std::vector<int32_t>(prompt.begin(), prompt.begin() + half)}},
                       {{"role", "user"},
                        {"content", std::vector<int32_t>(prompt.begin() + half, prompt.end())}}});
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

// Seeds through the public API in the serving mode (bf16) on 3 expert servers:
// the same seeded request at temperature 1 gives the same tokens again, alone
// or among concurrent requests of other lengths, for text chat (through the
// chat template), token-id chat, text and token-id completions, whole or
// streamed, and for the gRPC pass-through; other seeds give other tokens and
// unseeded requests differ. The vocabulary is widened to 32768 ids (the
// checkpoint's tokenizer has its special tokens at the end): sampling from
// near-uniform logits over that many ids flips on a change in the logits' last
// bits, so logits that depend on the batch or on timing fail this test.
TEST(ClusterGateway, SeedsGiveTheSameTokensOnEveryPath) {
  const std::string tokenizer = testing::FreshDir("tokenizer");
  absl::StatusOr<tools::GeneratedTokenizer> g =
      tools::GenerateTokenizer({.vocab_size = 32768, .bos_id = 32766, .eos_id = 32767});
  ASSERT_TRUE(g.ok()) << g.status();
  std::ofstream(tokenizer + "/tokenizer.json") << g->tokenizer_json;
  std::ofstream(tokenizer + "/tokenizer_config.json") << g->tokenizer_config_json;
  tools::MakeModelOptions mo;
  mo.preset = "tiny-v3";
  mo.out_dir = testing::FreshDir("model");
  mo.seed = 37;
  mo.tokenizer_dir = tokenizer;
  ASSERT_TRUE(tools::WriteRandomModel(mo).ok());
  const std::string model = mo.out_dir, dir = testing::FreshDir("cluster");

  Cluster c;
  c.set_expert_extra({"--dtype", "bf16"});
  ASSERT_TRUE(c.Start(model, 3, dir, {"--dtype", "bf16"}));
  ASSERT_TRUE(c.StartGateway(
      {"--tokenizer", model, "--grpc-port", "0", "--grpc-port-file", dir + "/gateway.grpc.port"}));
  const int grpc_port = testing::WaitForPortFile(dir + "/gateway.grpc.port", c.gateway());
  ASSERT_NE(grpc_port, 0) << c.gateway().Log();
  auto stub = v1::RouterService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(grpc_port), grpc::InsecureChannelCredentials()));

  // One request per path: `seed` < 0 sends none.
  const std::vector<int32_t> ids = {5, 17, 3, 99, 250, 7, 42, 11, 300, 2, 77};
  struct Path {
    std::string name;
    std::string endpoint;  // "" = gRPC
    json body;
  };
  auto user = [](json content) {
    return json{{"messages", json::array({json{{"role", "user"}, {"content", content}}})}};
  };
  const std::vector<Path> paths = {
      {"chat text", "/v1/chat/completions", user("Tell me a story about the sea.")},
      {"chat ids", "/v1/chat/completions", user(ids)},
      {"completion text", "/v1/completions", json{{"prompt", "Once upon a time there was"}}},
      {"completion ids", "/v1/completions", json{{"prompt", ids}}},
      {"grpc", "", json::object()}};
  auto run = [&](const Path& p, int64_t seed, bool stream) -> std::vector<int32_t> {
    const std::string where =
        p.name + (stream ? " (stream)" : "") + " seed " + std::to_string(seed);
    if (p.endpoint.empty()) {
      v1::GenerateRequest req;
      for (int32_t t : ids) req.add_prompt_tokens(t);
      req.set_max_tokens(kMaxTokens);
      req.set_ignore_eos(true);
      req.mutable_sampling()->set_temperature(1.0f);
      if (seed >= 0) req.mutable_sampling()->set_seed(static_cast<uint64_t>(seed));
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      auto reader = stub->Generate(&ctx, req);
      v1::GenerateResponse m;
      std::vector<int32_t> out;
      while (reader->Read(&m)) out.push_back(m.token());
      const grpc::Status st = reader->Finish();
      EXPECT_TRUE(st.ok()) << where << ": " << st.error_message();
      return out;
    }
    json body = p.body;
    body["max_tokens"] = kMaxTokens;
    body["temperature"] = 1;
    body["ignore_eos"] = true;
    body["stream"] = stream;
    if (seed >= 0) body["seed"] = seed;
    const bool chat = p.endpoint == "/v1/chat/completions";
    const HttpResponse r = c.HttpPost(p.endpoint, body.dump());
    return stream ? StreamedTokens(r, chat, where) : WholeTokens(r, chat, where);
  };

  // Alone, twice, whole and streamed: the same tokens.
  constexpr int64_t kSeed = 7;
  std::vector<std::vector<int32_t>> want;
  for (const Path& p : paths) {
    want.push_back(run(p, kSeed, false));
    ASSERT_EQ(want.back().size(), static_cast<size_t>(kMaxTokens)) << p.name;
    EXPECT_EQ(run(p, kSeed, false), want.back()) << p.name << ": again";
    if (!p.endpoint.empty()) {
      EXPECT_EQ(run(p, kSeed, true), want.back()) << p.name << ": streamed";
    }
  }
  // The token-id paths send the same prompt, so they agree with each other.
  EXPECT_EQ(want[3], want[1]) << "completion ids vs chat ids";
  EXPECT_EQ(want[4], want[1]) << "gRPC vs chat ids";

  // Among concurrent requests of other prompts and lengths (unseeded, so
  // sampled with other seeds), each path gives its tokens again.
  std::vector<std::vector<int32_t>> got(paths.size());
  std::vector<std::thread> threads;
  for (int k = 0; k < 6; ++k) {
    threads.emplace_back([&, k] {
      json noise = {{"prompt", std::vector<int32_t>(3 + 4 * k, 100 + k)},
                    {"max_tokens", 4 + 3 * k},
                    {"temperature", 1}};
      const HttpResponse r = c.HttpPost("/v1/completions", noise.dump());
      EXPECT_EQ(r.status, 200) << r.body;
    });
  }
  for (size_t i = 0; i < paths.size(); ++i) {
    threads.emplace_back([&, i] { got[i] = run(paths[i], kSeed, i % 2 == 1); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < paths.size(); ++i) {
    EXPECT_EQ(got[i], want[i]) << paths[i].name << " among concurrent requests";
  }

  // The seed matters: other seeds give other tokens (each could collide only
  // by chance), and unseeded requests differ from each other.
  for (size_t i : {size_t{0}, size_t{4}}) {
    std::set<std::vector<int32_t>> seen = {want[i]};
    for (int64_t seed : {1, 2, 3}) seen.insert(run(paths[i], seed, false));
    EXPECT_EQ(seen.size(), 4u) << paths[i].name;
    EXPECT_NE(run(paths[i], -1, false), run(paths[i], -1, false)) << paths[i].name << " unseeded";
  }

  EXPECT_EQ(c.gateway().Kill(SIGTERM), 0) << c.gateway().Log();
  EXPECT_EQ(c.router().Kill(SIGTERM), 0) << c.router().Log();
  for (int i = 0; i < 3; ++i) EXPECT_EQ(c.expert(i).Kill(SIGTERM), 0) << c.expert(i).Log();
}

}  // namespace
}  // namespace dmoe
