// serve_bench's parts without a server: the HTTP/SSE response parser on every
// split of the bytes, the per-request record and the run summary (percentiles,
// TPOT, goodput, failures), and the workload generator; and the client's early
// end of a stream against a real socket.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/serve/http_stream.h"
#include "bench/serve/launcher.h"
#include "bench/serve/router_sampler.h"
#include "bench/serve/stage_profile.h"
#include "bench/serve/stats.h"
#include "bench/serve/workload.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/subprocess.h"

namespace dmoe::bench::serve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Chunk(const std::string& data) {
  char size[16];
  std::snprintf(size, sizeof(size), "%zx", data.size());
  return std::string(size) + "\r\n" + data + "\r\n";
}

const std::string kSse =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" +
    Chunk("data: {\"choices\":[{\"a\":1}]}\n\n") + Chunk("data: {\"choices\":[{\"a\":22}]}\n\n") +
    Chunk("data: [DONE]\n\n") + "0\r\n\r\n";

TEST(ResponseParser, ChunkedSseInEverySplitGivesTheSameEvents) {
  for (size_t cut = 0; cut <= kSse.size(); ++cut) {
    ResponseParser p;
    ASSERT_TRUE(p.Feed(std::string_view(kSse).substr(0, cut), 1.0)) << cut << ": " << p.error();
    ASSERT_TRUE(p.Feed(std::string_view(kSse).substr(cut), 2.0)) << cut << ": " << p.error();
    ASSERT_TRUE(p.done()) << cut;
    EXPECT_EQ(p.status(), 200);
    EXPECT_TRUE(p.keep_alive());
    ASSERT_EQ(p.events().size(), 3u) << cut;
    EXPECT_EQ(p.events()[0].data, "{\"choices\":[{\"a\":1}]}");
    EXPECT_EQ(p.events()[2].data, "[DONE]");
    // An event gets the time of the read that completed its line.
    const size_t end0 = kSse.find("}]}\n") + 4;
    EXPECT_EQ(p.events()[0].t, cut >= end0 ? 1.0 : 2.0) << cut;
  }
}

TEST(ResponseParser, ContentLengthBodyAndConnectionClose) {
  const std::string r =
      "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 11\r\nConnection: close\r\n\r\n"
      "{\"error\":1}";
  ResponseParser p;
  ASSERT_TRUE(p.Feed(r, 0.5));
  EXPECT_TRUE(p.done());
  EXPECT_EQ(p.status(), 429);
  EXPECT_FALSE(p.keep_alive());
  EXPECT_EQ(p.body(), "{\"error\":1}");
}

TEST(ResponseParser, CloseDelimitedBodyEndsAtEof) {
  ResponseParser p;
  ASSERT_TRUE(p.Feed("HTTP/1.0 200 OK\r\n\r\nabc", 0.1));
  EXPECT_FALSE(p.done());
  EXPECT_TRUE(p.FinishAtEof(0.2));
  EXPECT_EQ(p.body(), "abc");
  EXPECT_EQ(p.done_t(), 0.2);
}

TEST(ResponseParser, MalformedOrTruncatedResponsesAreErrorsNamingTheProblem) {
  struct Case {
    std::string bytes, error;
  };
  for (const Case& c : std::vector<Case>{
           {"HTTP/2 200\r\n\r\n", "bad status line"},
           {"HTTP/1.1 2x0 OK\r\n\r\n", "bad status line"},
           {"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "bad header line"},
           {"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "bad Content-Length"},
           {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"},
           {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", "chunk not followed"},
           {"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", "bytes after the end"},
       }) {
    ResponseParser p;
    EXPECT_FALSE(p.Feed(c.bytes, 0));
    EXPECT_TRUE(p.failed());
    EXPECT_THAT(p.error(), HasSubstr(c.error)) << c.bytes;
  }
  ResponseParser truncated;
  ASSERT_TRUE(truncated.Feed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", 0));
  EXPECT_FALSE(truncated.FinishAtEof(1));
  EXPECT_THAT(truncated.error(), HasSubstr("mid-response"));
  ResponseParser nothing;
  EXPECT_FALSE(nothing.FinishAtEof(1));
  EXPECT_THAT(nothing.error(), HasSubstr("before an answer"));
}

HttpResult Stream(const std::vector<std::pair<double, std::string>>& events, double done) {
  HttpResult r;
  r.status = 200;
  for (const auto& [t, d] : events) r.events.push_back({t, d});
  r.done_t = done;
  return r;
}

TEST(RequestRecord, TokensComeFromTokenIdsAndUsageWins) {
  const HttpResult r = Stream({{0.5, R"({"choices":[{"text":"a","token_ids":[5]}]})"},
                               {0.6, R"({"choices":[{"text":"","token_ids":[6]}]})"},
                               {0.8, R"({"choices":[{"delta":{"content":"x"}}]})"},
                               {0.9, R"({"choices":[{"text":"","token_ids":[]}],)"
                                     R"("usage":{"prompt_tokens":7,"completion_tokens":3}})"},
                               {0.9, "[DONE]"}},
                              0.95);
  const RequestRecord rec = RecordFromHttp(r, 2.0, 99);
  EXPECT_TRUE(rec.ok) << rec.error;
  EXPECT_EQ(rec.ttft_s, 0.5);
  EXPECT_THAT(rec.token_t, ElementsAre(0.5, 0.6, 0.8));
  EXPECT_EQ(rec.output_tokens, 3);
  EXPECT_EQ(rec.prompt_tokens, 7);
  EXPECT_EQ(rec.e2e_s, 0.95);
  EXPECT_EQ(rec.start_s, 2.0);
}

// A client that stops reading after 3 tokens closes the connection while the
// server still streams; the record is a success with 3 tokens.
TEST(HttpStreamClient, StopEndsTheStreamByClosingTheConnection) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(listener, 1), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  bool saw_close = false;
  std::thread server([&] {
    const int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) return;
    char buf[4096];
    (void)recv(fd, buf, sizeof(buf), 0);  // the request (small: one read)
    std::string out =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 5; ++i) {
      out +=
          Chunk(absl::StrCat("data: {\"choices\":[{\"text\":\"t\",\"token_ids\":[", i, "]}]}\n\n"));
    }
    (void)send(fd, out.data(), out.size(), MSG_NOSIGNAL);
    // More would follow; the client closes first.
    timeval tv{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    saw_close = recv(fd, buf, sizeof(buf), 0) == 0;
    close(fd);
  });
  HttpStreamClient client("127.0.0.1", ntohs(addr.sin_port), 10);
  int left = 3;
  const HttpResult r = client.Post("/v1/completions", "{}", [&left](const SseEvent& e) {
    left -= TokensInEvent(e);
    return left <= 0;
  });
  server.join();
  close(listener);
  EXPECT_TRUE(saw_close) << "the server saw the client close the connection";
  EXPECT_TRUE(r.client_closed);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.events.size(), 3u);
  const RequestRecord rec = RecordFromHttp(r, 0, 4);
  EXPECT_TRUE(rec.ok) << rec.error;
  EXPECT_EQ(rec.output_tokens, 3);
}

TEST(RouterSampler, ParsesTheRoutersGaugesAndCountersOnly) {
  const auto v = ParseRouterValues(
      "# HELP moe_router_active_sequences x\n"
      "# TYPE moe_router_active_sequences gauge\n"
      "moe_router_active_sequences 12\n"
      "moe_router_queued_requests 3\n"
      "moe_router_preemptions_total 4.5e+01\n"
      "moe_router_prefix_cache_hit_tokens_total 96\n"
      "moe_router_kv_cache_blocks{state=\"used\"} 7\n"
      "moe_router_steps_total 100\n"
      "moe_router_recomputed_tokens_total nonsense\n");
  EXPECT_EQ(v.size(), 4u);
  EXPECT_EQ(v.at("moe_router_active_sequences"), 12);
  EXPECT_EQ(v.at("moe_router_queued_requests"), 3);
  EXPECT_EQ(v.at("moe_router_preemptions_total"), 45);
  EXPECT_EQ(v.at("moe_router_prefix_cache_hit_tokens_total"), 96);
  RouterSample s;
  s.n = 2;
  s.growth["moe_router_prefix_cache_queried_tokens_total"] = 200;
  s.growth["moe_router_prefix_cache_hit_tokens_total"] = 150;
  EXPECT_DOUBLE_EQ(s.PrefixHitRate(), 0.75);
  EXPECT_THAT(s.Format(), HasSubstr("prefix cache hit 75.0% of 200 prompt tokens"));
  EXPECT_EQ(RouterSample().Format(), "");
}

TEST(RequestRecord, FailuresSayWhy) {
  HttpResult refused;
  refused.status = 429;
  refused.body = R"({"error":{"message":"too many requests in flight","type":"x"}})";
  RequestRecord rec = RecordFromHttp(refused, 0, 1);
  EXPECT_FALSE(rec.ok);
  EXPECT_EQ(rec.error, "too many requests in flight");

  rec = RecordFromHttp(Stream({{0.1, R"({"choices":[{"token_ids":[1]}]})"}}, 0.2), 0, 1);
  EXPECT_FALSE(rec.ok);
  EXPECT_THAT(rec.error, HasSubstr("without [DONE]"));

  rec = RecordFromHttp(Stream({{0.1, R"({"error":{"message":"router gone"}})"}}, 0.2), 0, 1);
  EXPECT_FALSE(rec.ok);
  EXPECT_EQ(rec.error, "router gone");

  HttpResult transport;
  transport.error = "connect: refused";
  rec = RecordFromHttp(transport, 0, 1);
  EXPECT_FALSE(rec.ok);
  EXPECT_EQ(rec.status, 0);
}

RequestRecord Done(double start, double ttft, double e2e, int out, int in = 10) {
  RequestRecord r;
  r.ok = true;
  r.status = 200;
  r.start_s = start;
  r.ttft_s = ttft;
  r.e2e_s = e2e;
  r.output_tokens = out;
  r.prompt_tokens = in;
  for (int i = 0; i < out; ++i) r.token_t.push_back(ttft + (e2e - ttft) * i / std::max(1, out - 1));
  return r;
}

TEST(Summary, PercentilesThroughputTpotAndGoodput) {
  std::vector<RequestRecord> v;
  // TTFT 0.1 .. 1.0 s, 11 tokens over 1 s after it: TPOT 100 ms each.
  for (int i = 0; i < 10; ++i) v.push_back(Done(i, 0.1 * (i + 1), 0.1 * (i + 1) + 1.0, 11));
  RequestRecord failed;
  failed.status = 503;
  failed.start_s = 3;
  failed.error = "no router";
  v.push_back(failed);
  const Summary s = Summarize(v, Slo{.ttft_ms = 500, .tpot_ms = 0});
  EXPECT_EQ(s.completed, 10);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.errors.at("503"), 1);
  EXPECT_EQ(s.first_error, "no router");
  EXPECT_NEAR(s.ttft_ms.p50, 500, 1e-9);  // nearest rank: 5th of 10
  EXPECT_NEAR(s.ttft_ms.p90, 900, 1e-9);
  EXPECT_NEAR(s.ttft_ms.p99, 1000, 1e-9);
  EXPECT_NEAR(s.tpot_ms.p50, 100, 1e-9);
  EXPECT_NEAR(s.itl_ms.max, 100, 1e-9);
  EXPECT_EQ(s.itl_ms.n, 100);
  // Window: first start 0 to the last end 9 + 2.0 = 11 s.
  EXPECT_NEAR(s.window_s, 11.0, 1e-9);
  EXPECT_NEAR(s.output_tok_per_s, 110 / 11.0, 1e-9);
  EXPECT_NEAR(s.input_tok_per_s, 100 / 11.0, 1e-9);
  EXPECT_EQ(s.good, 5);  // TTFT <= 500 ms
  EXPECT_NEAR(s.goodput_req_per_s, 5 / 11.0, 1e-9);
  const nlohmann::json j = ToJson(s);
  EXPECT_EQ(j["ttft_ms"]["p90"].get<double>(), s.ttft_ms.p90);
  EXPECT_EQ(j["errors"]["503"].get<int>(), 1);
}

TEST(Workload, SameSeedSameRequestsAndExactTokenIdPrompts) {
  Workload w;
  w.vocab = 1000;
  w.input.mean = 12;
  w.output.mean = 5;
  w.num_prefixes = 2;
  w.prefix_len = 4;
  auto a = Generate(w, 6, 7), b = Generate(w, 6, 7), c = Generate(w, 6, 8);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ((*a)[i].body, (*b)[i].body);
    const nlohmann::json j = nlohmann::json::parse((*a)[i].body);
    ASSERT_EQ(j["prompt"].size(), 16u);
    EXPECT_EQ((*a)[i].prompt_tokens, 16);
    EXPECT_EQ(j["max_tokens"].get<int>(), 5);
    EXPECT_TRUE(j["ignore_eos"].get<bool>());
    EXPECT_TRUE(j["stream"].get<bool>());
    for (const auto& id : j["prompt"]) EXPECT_TRUE(id.get<int>() >= 16 && id.get<int>() < 1000);
    // Requests i and i + 2 share their first 4 tokens (prefix i mod 2).
    if (i >= 2) {
      const nlohmann::json k = nlohmann::json::parse((*a)[i - 2].body);
      for (int t = 0; t < 4; ++t) EXPECT_EQ(j["prompt"][t], k["prompt"][t]);
    }
  }
  EXPECT_NE((*a)[0].body, (*c)[0].body);
}

TEST(Workload, MaxTokensCapSendsTheCapAndStopsAtTheDrawnLength) {
  Workload w;
  w.vocab = 1000;
  w.input.mean = 8;
  w.output.kind = LengthDist::Kind::kLogNormal;
  w.output.mean = 50;
  w.max_tokens_cap = 400;
  auto reqs = Generate(w, 50, 3);
  ASSERT_TRUE(reqs.ok());
  std::set<int> lengths;
  for (const RequestSpec& r : *reqs) {
    EXPECT_EQ(nlohmann::json::parse(r.body)["max_tokens"].get<int>(), 400);
    EXPECT_EQ(r.stop_after, r.max_tokens);
    EXPECT_GE(r.stop_after, 1);
    EXPECT_LE(r.stop_after, 400);
    lengths.insert(r.stop_after);
  }
  EXPECT_GT(lengths.size(), 10u) << "drawn, not fixed";
  w.max_tokens_cap = 0;
  auto uncapped = Generate(w, 5, 3);
  ASSERT_TRUE(uncapped.ok());
  for (const RequestSpec& r : *uncapped) {
    EXPECT_EQ(r.stop_after, 0);
    EXPECT_EQ(nlohmann::json::parse(r.body)["max_tokens"].get<int>(), r.max_tokens);
  }
}

// The steady window runs from the warm-up-th completion to the last start;
// tokens of any request inside it count, those outside do not.
TEST(Summary, SteadyRateCountsTokensWhileEveryUserIsBusy) {
  auto rec = [](double start, double e2e, std::vector<double> tokens) {
    RequestRecord r;
    r.start_s = start;
    r.e2e_s = e2e;
    r.token_t = std::move(tokens);
    return r;
  };
  const std::vector<RequestRecord> all = {
      rec(0, 2, {0.5, 1, 1.5, 2}),  // ends at 2 (the first completion)
      rec(0, 5, {1, 3, 4, 5}),      // ends at 5
      rec(2, 4, {1, 2, 3, 4}),      // tokens at 3, 4, 5, 6
      rec(5, 3, {1, 2, 3}),         // the last start: 5; tokens at 6, 7, 8
  };
  const SteadyRate r = SteadyOutputRate(all, 1, /*min_window_s=*/0);
  EXPECT_EQ(r.begin_s, 2);
  EXPECT_EQ(r.window_s, 3);
  // In [2, 5): 2 (first), 3, 4 (second), 3, 4 (third).
  EXPECT_EQ(r.tokens, 5);
  EXPECT_DOUBLE_EQ(r.output_tok_per_s, 5.0 / 3);
  EXPECT_EQ(SteadyOutputRate(all, 0, 0).begin_s, 0);
  EXPECT_EQ(SteadyOutputRate(all, 1).window_s, 0) << "3 s is under the 10 s minimum";
  EXPECT_EQ(SteadyOutputRate(all, 3, 0).window_s, 0)
      << "the 3rd completion (6) is after the last start";
  EXPECT_EQ(SteadyOutputRate({}, 0).window_s, 0);
}

TEST(Workload, LengthDistributionsHaveTheirMeans) {
  std::mt19937_64 rng(3);
  for (auto kind : {LengthDist::Kind::kUniform, LengthDist::Kind::kLogNormal}) {
    LengthDist d{.kind = kind, .mean = 200};
    double sum = 0;
    int lo = 1 << 30, hi = 0;
    for (int i = 0; i < 20000; ++i) {
      const int v = d.Draw(rng);
      sum += v;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    EXPECT_NEAR(sum / 20000, 200, 6) << LengthKindName(kind);
    if (kind == LengthDist::Kind::kUniform) {
      EXPECT_EQ(lo, 100);
      EXPECT_EQ(hi, 300);
    }
  }
  LengthDist fixed{.mean = 3};
  EXPECT_EQ(fixed.Draw(rng), 3);
}

TEST(Workload, ChatTextAndInvalidCombinations) {
  Workload w;
  w.api = Workload::Api::kChat;
  w.prompt = Workload::Prompt::kText;
  w.num_prefixes = 1;
  w.prefix_len = 3;
  auto r = Generate(w, 1, 1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].path, "/v1/chat/completions");
  const nlohmann::json j = nlohmann::json::parse((*r)[0].body);
  EXPECT_EQ(j["messages"][0]["role"], "system");
  EXPECT_EQ(j["messages"][1]["role"], "user");

  w.prompt = Workload::Prompt::kTokenIds;
  w.vocab = 100;
  EXPECT_THAT(Generate(w, 1, 1).status().message(), HasSubstr("chat requests carry text"));
  w.api = Workload::Api::kCompletions;
  w.vocab = 10;
  EXPECT_THAT(Generate(w, 1, 1).status().message(), HasSubstr("vocabulary above id"));
}

TEST(ClusterConfig, ParsesKeysAndNamesBadOnes) {
  auto c = ParseClusterConfig("disagg:servers=2,shared=router,wire=fp8,micro=1,threads=1");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->name, "disagg");
  EXPECT_EQ(c->servers, 2);
  EXPECT_EQ(c->shared_expert, "router");
  EXPECT_EQ(c->wire_dtype, "fp8");
  EXPECT_EQ(c->micro_batches, 1);
  EXPECT_EQ(ParseClusterConfig("x:kv-block=64")->kv_block_tokens, 64);
  EXPECT_THAT(ParseClusterConfig("x:kv-block=5000").status().message(), HasSubstr("kv-block=5000"));
  const auto kv = ParseClusterConfig("x:kv-bytes=64M,kv-admission=reserve,prefix-cache=off");
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ(kv->kv_cache_bytes, int64_t{64} << 20);
  EXPECT_EQ(kv->kv_admission, "reserve");
  EXPECT_EQ(kv->prefix_cache, "off");
  EXPECT_THAT(kv->Describe(), HasSubstr("KV cache 67108864 bytes, KV admission reserve"));
  EXPECT_EQ(ParseClusterConfig("x:kv-bytes=1000")->kv_cache_bytes, 1000);
  EXPECT_THAT(ParseClusterConfig("x:kv-bytes=0").status().message(), HasSubstr("kv-bytes=0"));
  EXPECT_THAT(ParseClusterConfig("x:kv-bytes=3T").status().message(), HasSubstr("suffix"));
  EXPECT_THAT(ParseClusterConfig("x:kv-admission=lazy").status().message(),
              HasSubstr("paged or reserve"));
  EXPECT_THAT(ParseClusterConfig("x:prefix-cache=yes").status().message(), HasSubstr("on or off"));
  EXPECT_EQ(ParseClusterConfig("x:kv-dtype=bf16")->kv_dtype, "bf16");
  EXPECT_THAT(ParseClusterConfig("x:kv-dtype=fp8").status().message(), HasSubstr("auto, f32"));
  EXPECT_THAT(ParseClusterConfig("x:servers=-1").status().message(), HasSubstr("servers=-1"));
  EXPECT_THAT(ParseClusterConfig("x:colour=red").status().message(), HasSubstr("unknown key"));
  EXPECT_THAT(ParseClusterConfig(":servers=1").status().message(), HasSubstr("NAME:"));
}

TEST(ClusterConfig, SpinSettingsBecomeTheProcessesEnvironment) {
  using ::testing::IsEmpty;
  // auto: only processes that share the cores with others stop spinning early.
  unsetenv("GOMP_SPINCOUNT");
  unsetenv("OMP_WAIT_POLICY");
  EXPECT_THAT(ParseClusterConfig("one:servers=0")->SpinEnv(), IsEmpty());
  EXPECT_THAT(ParseClusterConfig("d:servers=2")->SpinEnv(),
              ElementsAre(absl::StrCat("GOMP_SPINCOUNT=", kColocatedSpinCount)));
  EXPECT_THAT(ParseClusterConfig("d:servers=2,spin=default")->SpinEnv(), IsEmpty());
  EXPECT_THAT(ParseClusterConfig("d:servers=0,spin=passive")->SpinEnv(),
              ElementsAre("OMP_WAIT_POLICY=passive"));
  EXPECT_THAT(ParseClusterConfig("d:servers=0,spin=500")->SpinEnv(),
              ElementsAre("GOMP_SPINCOUNT=500"));
  EXPECT_THAT(ParseClusterConfig("d:servers=2")->Describe(), HasSubstr("GOMP_SPINCOUNT="));
  // The user's own setting (inherited by the children) wins over auto.
  ASSERT_EQ(setenv("OMP_WAIT_POLICY", "active", 1), 0);
  EXPECT_THAT(ParseClusterConfig("d:servers=2")->SpinEnv(), IsEmpty());
  unsetenv("OMP_WAIT_POLICY");
  EXPECT_THAT(ParseClusterConfig("d:spin=sometimes").status().message(),
              HasSubstr("spin=sometimes"));
  EXPECT_THAT(ParseClusterConfig("d:spin=-1").status().message(), HasSubstr("spin count"));
}

// The launcher's processes get the configuration's environment on top of ours.
TEST(ChildProcessEnv, OverridesAndAddsNamesKeepsTheRest) {
  ASSERT_EQ(setenv("DMOE_TEST_KEEP", "kept", 1), 0);
  ASSERT_EQ(setenv("DMOE_TEST_REPLACE", "old", 1), 0);
  const std::string sh = testing::FindInPath("sh");
  ASSERT_FALSE(sh.empty());
  const std::string log = ::testing::TempDir() + "/child_env.log";
  std::remove(log.c_str());
  testing::ChildProcess child;
  ASSERT_TRUE(child.Start({sh, "-c", "echo \"$DMOE_TEST_KEEP/$DMOE_TEST_REPLACE/$DMOE_TEST_NEW\""},
                          log, {"DMOE_TEST_REPLACE=new", "DMOE_TEST_NEW=added"}));
  EXPECT_EQ(child.Wait(std::chrono::seconds(20)), 0);
  EXPECT_EQ(child.Log(), "kept/new/added\n");
}

TEST(StageProfile, ParsesTheRoutersCountersAndDiffsThem) {
  const std::string before =
      "# HELP moe_router_step_stage_seconds_total x\n"
      "moe_router_step_stage_seconds_total{phase=\"decode\",stage=\"attention\"} 1.5\n"
      "moe_router_step_stage_seconds_total{phase=\"decode\",stage=\"experts\"} 2\n"
      "moe_router_phase_steps_total{phase=\"decode\"} 10\n"
      "moe_router_steps_total 10\n";
  const std::string after =
      "moe_router_step_stage_seconds_total{phase=\"decode\",stage=\"attention\"} 2.5\n"
      "moe_router_step_stage_seconds_total{phase=\"decode\",stage=\"experts\"} 5\n"
      "moe_router_step_stage_seconds_total{phase=\"prefill\",stage=\"attention\"} 0.5\n"
      "moe_router_phase_steps_total{phase=\"decode\"} 30\n"
      "moe_router_phase_steps_total{phase=\"prefill\"} 1\n";
  const StageCounters b = ParseStageCounters(before);
  EXPECT_EQ(b.seconds.at("decode").at("attention"), 1.5);
  EXPECT_EQ(b.steps.at("decode"), 10);
  const StageCounters d = Delta(ParseStageCounters(after), b);
  EXPECT_EQ(d.seconds.at("decode").at("attention"), 1.0);
  EXPECT_EQ(d.seconds.at("decode").at("experts"), 3.0);
  EXPECT_EQ(d.seconds.at("prefill").at("attention"), 0.5);
  EXPECT_EQ(d.steps.at("decode"), 20);
  // 20 decode steps: attention 50 ms per step (25%), experts 150 ms (75%).
  const std::string text = Format(d);
  EXPECT_THAT(text, HasSubstr("decode      20 steps, 200.00 ms/step: attention 50.00 (25%)"));
  EXPECT_THAT(text, HasSubstr("experts 150.00 (75%)"));
  EXPECT_EQ(ToJson(d)["decode"]["ms_per_step"]["experts"].get<double>(), 150.0);
  EXPECT_TRUE(Format(StageCounters{}).empty());
}

}  // namespace
}  // namespace dmoe::bench::serve
