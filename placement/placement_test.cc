#include "placement/placement.h"

#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::place {
namespace {

core::ModelConfig Cfg() {
  core::ModelConfig c;
  c.model_type = core::ModelType::kDeepseekV2;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_shared_experts = 1;
  return c;
}

TEST(Placement, ContiguousCoversEveryExpertOnce) {
  auto p = Placement::Contiguous(Cfg(), 3);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->Slots(0, 0).empty());  // dense layer
  for (int l = 1; l < 3; ++l) {
    for (int e = 0; e < 8; ++e) EXPECT_EQ(p->Replicas(l, e).size(), 1u) << e;
  }
  EXPECT_EQ(p->Slots(1, 0), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(p->Slots(1, 2), (std::vector<int32_t>{5, 6, 7}));
}

TEST(Placement, JsonRoundTripAndValidation) {
  auto p = Placement::Contiguous(Cfg(), 2, 7);
  ASSERT_TRUE(p.ok());
  auto q = Placement::FromJson(p->ToJson(), Cfg());
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->version(), 7u);
  EXPECT_EQ(q->ToJson(), p->ToJson());

  nlohmann::json j = p->ToJson();
  j["layers"][0]["servers"][0] = {0, 0, 1, 2, 3};
  EXPECT_NE(Placement::FromJson(j, Cfg()).status().message().find("twice"), std::string::npos);
  j = p->ToJson();
  j["layers"][0]["servers"][0] = {0, 1, 2};
  EXPECT_NE(Placement::FromJson(j, Cfg()).status().message().find("expert 3 is on no server"),
            std::string::npos);
  j = p->ToJson();
  j["layers"][0]["servers"][1] = {4, 5, 6, 99};
  EXPECT_NE(Placement::FromJson(j, Cfg()).status().message().find("out of range"),
            std::string::npos);
  j = p->ToJson();
  j["layers"].erase(1);
  EXPECT_NE(Placement::FromJson(j, Cfg()).status().message().find("MoE layer 2 is missing"),
            std::string::npos);
}

// Found by fuzz/placement_fuzz: a non-numeric "version" threw out of FromJson
// (nlohmann type_error: the process aborted), a huge num_servers allocated
// layers x num_servers lists before any check (OOM), and expert ids beyond
// int32 were truncated into range (4294967297 -> 1).
TEST(Placement, FromJsonRejectsBadVersionHugeServerCountAndWideIds) {
  auto p = Placement::Contiguous(Cfg(), 2, 7);
  ASSERT_TRUE(p.ok());
  nlohmann::json j = p->ToJson();
  j["version"] = "x";
  auto st = Placement::FromJson(j, Cfg()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()),
              ::testing::HasSubstr("\"version\" must be a non-negative integer"));
  j["version"] = -1;
  EXPECT_EQ(Placement::FromJson(j, Cfg()).status().code(), absl::StatusCode::kInvalidArgument);

  j = p->ToJson();
  j["num_servers"] = 1000000000;
  st = Placement::FromJson(j, Cfg()).status();
  EXPECT_THAT(std::string(st.message()),
              ::testing::HasSubstr("lists 2 servers, expected 1000000000"));
  j["num_servers"] = int64_t{1} << 40;
  st = Placement::FromJson(j, Cfg()).status();
  EXPECT_THAT(std::string(st.message()),
              ::testing::HasSubstr("num_servers 1099511627776 is too large"));

  j = p->ToJson();
  j["layers"][0]["servers"][0][0] = (int64_t{1} << 32) + 1;
  st = Placement::FromJson(j, Cfg()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr("expert id 4294967297 out of range"));
}

TEST(SplitByServer, OncePerServerWithLocalAssignments) {
  auto p = Placement::Contiguous(Cfg(), 2);  // server 0: 0-3, server 1: 4-7
  ASSERT_TRUE(p.ok());
  // token 0 -> experts 1, 2 (+shared); token 1 -> 1, 6 (+shared).
  std::vector<int32_t> off = {0, 3, 6}, ids = {1, 2, core::kSharedFfn, 1, 6, core::kSharedFfn};
  std::vector<float> w = {0.5f, 0.25f, 1.0f, 0.75f, 0.125f, 1.0f};
  std::vector<float> x(2 * 4);
  core::ExpertBatch b{1, 2, 4, x.data(), off, ids, w};
  std::vector<int64_t> queued = {0, 0};
  auto shares = SplitByServer(b, *p, queued, SharedDuty::kExpertServers);
  ASSERT_TRUE(shares.ok()) << shares.status();
  const auto& s0 = (*shares)[0];
  const auto& s1 = (*shares)[1];
  EXPECT_EQ(s0.tokens, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(s1.tokens, (std::vector<int32_t>{1}));
  // Token 0 visits only server 0, which gets its shared duty; every assignment
  // lands exactly once over all servers.
  int shared_total = 0, routed_total = 0;
  for (const auto& s : *shares) {
    for (int32_t id : s.ffn_ids) (id == core::kSharedFfn ? shared_total : routed_total)++;
  }
  EXPECT_EQ(shared_total, 2);
  EXPECT_EQ(routed_total, 4);
  EXPECT_EQ(s0.ffn_ids[0], 1);
  EXPECT_EQ(s0.ffn_ids[1], 2);
  EXPECT_EQ(s0.ffn_ids[2], core::kSharedFfn);
}

TEST(SplitByServer, RouterDutyDropsShared) {
  auto p = Placement::Contiguous(Cfg(), 2);
  std::vector<int32_t> off = {0, 2}, ids = {1, core::kSharedFfn};
  std::vector<float> w = {1.0f, 1.0f}, x(4);
  core::ExpertBatch b{1, 1, 4, x.data(), off, ids, w};
  auto shares = SplitByServer(b, *p, std::vector<int64_t>{0, 0}, SharedDuty::kRouter);
  ASSERT_TRUE(shares.ok());
  EXPECT_EQ((*shares)[0].ffn_ids, (std::vector<int32_t>{1}));
  EXPECT_TRUE((*shares)[1].tokens.empty());
}

TEST(SplitByServer, ReplicaPrefersVisitedServerElseLeastLoaded) {
  nlohmann::json j = nlohmann::json::parse(R"({"version": 2, "num_servers": 3, "layers": [
      {"layer": 1, "servers": [[0, 1, 2, 3], [4, 5, 6, 7, 0], [0, 1, 2, 3]]},
      {"layer": 2, "servers": [[0, 1, 2, 3], [4, 5, 6, 7], []]}]})");
  auto p = Placement::FromJson(j, Cfg());
  ASSERT_TRUE(p.ok()) << p.status();
  std::vector<float> x(4);
  // Token visits server 1 for expert 5, so expert 0 (replicas 0, 1, 2) goes to 1.
  std::vector<int32_t> off = {0, 2}, ids = {5, 0};
  std::vector<float> w = {1, 1};
  core::ExpertBatch b{1, 1, 4, x.data(), off, ids, w};
  auto shares = SplitByServer(b, *p, std::vector<int64_t>{0, 0, 0}, SharedDuty::kExpertServers);
  ASSERT_TRUE(shares.ok());
  EXPECT_EQ((*shares)[1].ffn_ids, (std::vector<int32_t>{5, 0}));
  EXPECT_TRUE((*shares)[0].tokens.empty());
  // Expert 1 alone (replicas 0 and 2): the less loaded server 2.
  std::vector<int32_t> ids2 = {1, 3};
  core::ExpertBatch b2{1, 1, 4, x.data(), off, ids2, w};
  shares = SplitByServer(b2, *p, std::vector<int64_t>{10, 0, 3}, SharedDuty::kExpertServers);
  ASSERT_TRUE(shares.ok());
  EXPECT_EQ((*shares)[2].ffn_ids, (std::vector<int32_t>{1, 3}));
}

}  // namespace
}  // namespace dmoe::place
