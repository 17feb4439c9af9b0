// Readiness (issue 13.3): a router is ready only while every routed expert of
// every MoE layer has a live expert server; the monitor reports changes.
#include "router_service/readiness.h"

#include <atomic>
#include <set>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace dmoe::router {
namespace {

using ::testing::HasSubstr;

class FixedControl : public RemoteExpertControl {
 public:
  FixedControl(place::Placement p, std::vector<std::string> servers)
      : p_(std::move(p)), servers_(std::move(servers)) {}
  absl::Status SwitchPlacement(place::Placement, std::vector<std::string>,
                               absl::Duration) override {
    return absl::UnimplementedError("fixed");
  }
  place::Placement placement() const override { return p_; }
  std::vector<std::string> servers() const override { return servers_; }
  size_t PooledBufferBytes() const override { return 0; }

 private:
  place::Placement p_;
  std::vector<std::string> servers_;
};

class ReadinessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = testing::MakeModel("tiny-v3", 43);
    auto cfg = core::ModelConfig::FromFile(dir + "/config.json");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      if (cfg_.IsMoeLayer(l)) moe_layers_.push_back(l);
    }
    ASSERT_FALSE(moe_layers_.empty());
  }
  core::ModelConfig cfg_;
  std::vector<int64_t> moe_layers_;
};

TEST_F(ReadinessTest, ServableOnlyWhileEveryExpertHasALiveServer) {
  auto p = place::Placement::Contiguous(cfg_, 3);
  ASSERT_TRUE(p.ok());
  const std::vector<std::string> addrs = {"a:1", "b:2", "c:3"};
  EXPECT_TRUE(
      CheckServable(cfg_, *p, addrs, {absl::OkStatus(), absl::OkStatus(), absl::OkStatus()}).ok());
  const absl::Status down = CheckServable(
      cfg_, *p, addrs,
      {absl::OkStatus(), absl::UnavailableError("connection refused"), absl::OkStatus()});
  EXPECT_EQ(down.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(
      std::string(down.message()),
      HasSubstr(absl::StrCat("cannot serve a token: layer ", moe_layers_[0],
                             " expert 5 has no live expert server (", 5 * moe_layers_.size(),
                             " experts in all; server 1 (b:2): connection refused)")));
  // No servers at all.
  EXPECT_EQ(CheckServable(cfg_, *p, addrs, {}).code(), absl::StatusCode::kUnavailable);
}

TEST_F(ReadinessTest, AReplicaElsewhereKeepsItServable) {
  // Two servers holding every expert: either one is enough.
  nlohmann::json layers = nlohmann::json::array();
  std::vector<int> all(cfg_.n_routed_experts);
  for (int e = 0; e < cfg_.n_routed_experts; ++e) all[e] = e;
  for (int64_t l : moe_layers_) layers.push_back({{"layer", l}, {"servers", {all, all}}});
  const nlohmann::json j = {{"version", 1}, {"num_servers", 2}, {"layers", layers}};
  auto p = place::Placement::FromJson(j, cfg_);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(
      CheckServable(cfg_, *p, {"a:1", "b:2"}, {absl::UnavailableError("x"), absl::OkStatus()})
          .ok());
  EXPECT_FALSE(CheckServable(cfg_, *p, {"a:1", "b:2"},
                             {absl::UnavailableError("x"), absl::UnavailableError("y")})
                   .ok());
}

TEST_F(ReadinessTest, MonitorReportsEachChangeOnce) {
  auto p = place::Placement::Contiguous(cfg_, 2);
  ASSERT_TRUE(p.ok());
  FixedControl control(*p, {"a:1", "b:2"});
  absl::Mutex mu;
  std::set<std::string> down;
  std::vector<bool> changes;
  ReadinessMonitor m(
      cfg_, &control,
      [&](const std::string& address, absl::Duration) {
        absl::MutexLock lock(&mu);
        return down.count(address) ? absl::UnavailableError("down") : absl::OkStatus();
      },
      [&](const absl::Status& st) {
        absl::MutexLock lock(&mu);
        changes.push_back(st.ok());
      },
      ReadinessOptions{absl::Hours(1), absl::Seconds(1)});
  EXPECT_TRUE(m.Ready().ok());  // before the first check
  m.Start();                    // checks once
  EXPECT_TRUE(m.Ready().ok());
  EXPECT_TRUE(m.CheckNow().ok());
  {
    absl::MutexLock lock(&mu);
    down.insert("b:2");
  }
  EXPECT_EQ(m.CheckNow().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(m.CheckNow().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(m.Ready().message()), HasSubstr("server 1 (b:2): down"));
  {
    absl::MutexLock lock(&mu);
    down.clear();
  }
  EXPECT_TRUE(m.CheckNow().ok());
  m.Stop();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(changes, (std::vector<bool>{true, false, true}));
}

}  // namespace
}  // namespace dmoe::router
