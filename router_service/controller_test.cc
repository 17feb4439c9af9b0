// PlacementController against real expert servers (in-process ExpertServer on
// 127.0.0.1, real gRPC) and a real RemoteExpertBackend: plans from a skewed
// load window, live re-placement (load, switch, unload) with batches computed
// all along, the imbalance trigger, scale-out and scale-in.
#include "router_service/controller.h"

#include <atomic>
#include <cmath>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/ffn_loader.h"
#include "core/model.h"
#include "expert_service/expert_server.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace dmoe::router {
namespace {

using ::testing::HasSubstr;

class ControllerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeModel("tiny-v3", 41, tools::WeightFormat::kF32);
    auto cfg = core::ModelConfig::FromFile(dir_ + "/config.json");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    // Every FFN of every MoE layer in one local backend: the reference.
    reference_ = core::MakeCpuExpertBackend(core::ComputeType::kF32);
    auto ckpt = core::Checkpoint::Open(dir_);
    ASSERT_TRUE(ckpt.ok());
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      if (!cfg_.IsMoeLayer(l)) continue;
      moe_layers_.push_back(static_cast<int32_t>(l));
      for (int32_t e = 0; e < cfg_.n_routed_experts; ++e) {
        ASSERT_TRUE(core::LoadFfnInto(**ckpt, core::FfnPrefix(l, e), cfg_.hidden_size,
                                      cfg_.moe_intermediate_size, static_cast<int32_t>(l), e,
                                      *reference_)
                        .ok());
      }
      ASSERT_TRUE(core::LoadFfnInto(**ckpt, core::FfnPrefix(l, core::kSharedFfn), cfg_.hidden_size,
                                    cfg_.n_shared_experts * cfg_.moe_intermediate_size,
                                    static_cast<int32_t>(l), core::kSharedFfn, *reference_)
                      .ok());
    }
  }

  // Starts server `index` of `placement` (a server with no slots there joins
  // empty).
  void StartServer(const place::Placement& placement, int index) {
    expert::ExpertServerOptions o;
    o.model_dir = dir_;
    o.server_index = index;
    o.placement = placement;
    o.compute = core::ComputeType::kF32;
    o.threads = 1;
    auto s = expert::ExpertServer::Create(o);
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->Start("127.0.0.1", 0).ok());
    addresses_.push_back(absl::StrCat("127.0.0.1:", (*s)->port()));
    servers_.push_back(std::move(*s));
  }

  void StartCluster(int n) {
    auto p = place::Placement::Contiguous(cfg_, n);
    ASSERT_TRUE(p.ok());
    for (int s = 0; s < n; ++s) StartServer(*p, s);
    RemoteExpertOptions o;
    o.servers = addresses_;
    o.placement = *p;
    o.wire_dtype = common::WireDType::kF32;
    o.local_compute = core::ComputeType::kF32;
    auto made = MakeRemoteExperts(o);
    ASSERT_TRUE(made.ok()) << made.status();
    remote_ = std::move(made->backend);
    control_ = made->control;
    window_ = std::make_unique<LoadWindow>(cfg_.num_hidden_layers, cfg_.n_routed_experts, 64,
                                           LoadWindowOptions{});
  }

  std::unique_ptr<PlacementController> MakeController(ControllerOptions o) {
    auto c = PlacementController::Create(cfg_, window_.get(), control_, o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  // Routing where experts 0..2 get most tokens (all on server 0 of a
  // contiguous placement).
  void FeedSkew(int tokens) {
    const int64_t E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
    std::mt19937 rng(5);
    for (int32_t l : moe_layers_) {
      core::GateResult r;
      r.num_tokens = tokens;
      r.top_k = K;
      for (int t = 0; t < tokens; ++t) {
        std::vector<int32_t> chosen = {0, 1, 2};
        while (static_cast<int64_t>(chosen.size()) < K) {
          const int32_t e = 3 + static_cast<int32_t>(rng() % (E - 3));
          if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
        }
        for (int32_t e : chosen) {
          r.experts.push_back(e);
          r.weights.push_back(0.25f);
        }
        for (int64_t e = 0; e < E; ++e) r.scores.push_back(e < 3 ? 0.2f : 0.4f / (E - 3));
      }
      window_->AddRouting(l, r, absl::Now());
    }
  }

  // A random batch through the remote backend, checked against the reference.
  void ExpectComputeExact(uint32_t seed) {
    const int64_t H = cfg_.hidden_size, T = 24, K = cfg_.num_experts_per_tok;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<float> x(T * H);
    for (float& v : x) v = u(rng);
    for (int32_t l : moe_layers_) {
      std::vector<int32_t> offsets{0}, ids;
      std::vector<float> w;
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int32_t> all(cfg_.n_routed_experts);
        for (int32_t e = 0; e < cfg_.n_routed_experts; ++e) all[e] = e;
        std::shuffle(all.begin(), all.end(), rng);
        for (int64_t k = 0; k < K; ++k) {
          ids.push_back(all[k]);
          w.push_back(0.1f + 0.2f * static_cast<float>(k));
        }
        ids.push_back(core::kSharedFfn);
        w.push_back(1.0f);
        offsets.push_back(static_cast<int32_t>(ids.size()));
      }
      core::ExpertBatch b{l, T, H, x.data(), offsets, ids, w};
      std::vector<float> got(T * H), want(T * H);
      absl::Status st = remote_->Compute(b, got.data());
      ASSERT_TRUE(st.ok()) << st;
      ASSERT_TRUE(reference_->Compute(b, want.data()).ok());
      double num = 0, den = 0;
      for (int64_t i = 0; i < T * H; ++i) {
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
      }
      ASSERT_LT(std::sqrt(num / den), 1e-6) << "layer " << l;
    }
  }

  v1::ServerStatusResponse Status(int s) {
    auto stub = v1::ExpertService::NewStub(
        grpc::CreateChannel(addresses_[s], grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ServerStatusResponse r;
    EXPECT_TRUE(stub->GetStatus(&ctx, v1::ServerStatusRequest(), &r).ok());
    return r;
  }

  // The placement the router uses equals what every server holds.
  void ExpectServersHoldThePlacement() {
    const place::Placement p = control_->placement();
    for (int s = 0; s < static_cast<int>(servers_.size()); ++s) {
      v1::ServerStatusResponse st = Status(s);
      EXPECT_EQ(st.placement_version(), p.version()) << "server " << s;
      for (const v1::LayerSlots& ls : st.slots()) {
        std::vector<int32_t> held(ls.experts().begin(), ls.experts().end());
        std::sort(held.begin(), held.end());
        EXPECT_EQ(held, p.Slots(ls.layer(), s)) << "server " << s << " layer " << ls.layer();
      }
    }
  }

  std::string dir_;
  core::ModelConfig cfg_;
  std::vector<int32_t> moe_layers_;
  std::unique_ptr<core::ExpertBackend> reference_;
  std::vector<std::unique_ptr<expert::ExpertServer>> servers_;
  std::vector<std::string> addresses_;
  std::unique_ptr<core::ExpertBackend> remote_;
  RemoteExpertControl* control_ = nullptr;
  std::unique_ptr<LoadWindow> window_;
};

TEST_F(ControllerTest, RebalanceMovesHotExpertsApartWithoutStoppingTraffic) {
  StartCluster(3);
  ControllerOptions o;
  o.slots_per_server = 7;  // 21 slots for 16 experts: room for 5 replicas
  o.auto_rebalance = false;
  auto c = MakeController(o);
  ASSERT_NE(c, nullptr);
  FeedSkew(600);
  ExpectComputeExact(1);

  auto dry = c->Rebalance(true, "operator");
  ASSERT_TRUE(dry.ok()) << dry.status();
  EXPECT_FALSE(dry->applied());
  EXPECT_EQ(control_->placement().version(), 1u) << "a dry run changes nothing";
  ASSERT_EQ(dry->layers_size(), static_cast<int>(moe_layers_.size()));
  for (int i = 0; i < dry->layers_size(); ++i) {
    EXPECT_GT(dry->current_max_over_mean(i), 1.3);
    EXPECT_LT(dry->predicted_max_over_mean(i), 1.15);
  }
  EXPECT_GT(dry->slots_moved(), 0u);
  EXPECT_EQ(dry->bytes_moved(),
            dry->slots_moved() * 3 * cfg_.hidden_size * cfg_.moe_intermediate_size * 2);

  // Traffic keeps flowing while the plan is applied.
  std::atomic<bool> stop{false};
  std::atomic<int> batches{0};
  std::thread traffic([&] {
    for (uint32_t seed = 100; !stop; ++seed) {
      ExpectComputeExact(seed);
      ++batches;
    }
  });
  while (batches < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::vector<v1::RebalanceResponse> events;
  c->set_on_replacement([&](const v1::RebalanceResponse& r) { events.push_back(r); });
  auto applied = c->Rebalance(false, "operator");
  const int at_switch = batches;
  while (batches < at_switch + 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  stop = true;
  traffic.join();
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_TRUE(applied->applied());
  EXPECT_EQ(applied->version(), 2u);
  EXPECT_EQ(control_->placement().version(), 2u);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].trigger(), "operator");
  ExpectServersHoldThePlacement();
  for (int i = 0; i < applied->layers_size(); ++i)
    EXPECT_LT(applied->predicted_max_over_mean(i), 1.15);
  // The balance the router measures now.
  const LoadSnapshot snap = window_->Get(absl::Now());
  for (int32_t l : moe_layers_) {
    EXPECT_LT(ComputeBalance(snap, l, cfg_.num_experts_per_tok, control_->placement())
                  .server_max_over_mean,
              1.15);
  }
  v1::ExpertLoadResponse load = c->GetExpertLoad();
  EXPECT_EQ(load.placement_version(), 2u);
  ASSERT_EQ(load.layers_size(), static_cast<int>(moe_layers_.size()));
  EXPECT_LT(load.layers(0).server_max_over_mean(), 1.15);
  EXPECT_GT(load.layers(0).expert_load(0), load.layers(0).expert_load(5));
  v1::PlacementResponse pl = c->GetPlacement();
  EXPECT_EQ(pl.version(), 2u);
  EXPECT_EQ(pl.server_addresses_size(), 3);
  ExpectComputeExact(7);
}

TEST_F(ControllerTest, ImbalanceTriggersOnItsOwnAfterTheSustainTime) {
  StartCluster(3);
  ControllerOptions o;
  o.slots_per_server = 7;
  o.sustain = absl::Milliseconds(300);
  o.min_interval = absl::ZeroDuration();
  o.check_interval = absl::Milliseconds(50);
  auto c = MakeController(o);
  ASSERT_NE(c, nullptr);
  c->Start();
  FeedSkew(600);
  const absl::Time t0 = absl::Now();
  while (control_->placement().version() == 1 && absl::Now() - t0 < absl::Seconds(20)) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(control_->placement().version(), 2u);
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(250)) << "not before the sustain time";
  // Balanced now: no further re-placement.
  absl::SleepFor(absl::Milliseconds(800));
  c->Stop();
  EXPECT_EQ(control_->placement().version(), 2u);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(3);
}

TEST_F(ControllerTest, ScaleOutGivesANewServerSlotsAndScaleInEmptiesOne) {
  StartCluster(3);
  ControllerOptions o;
  o.slots_per_server = 6;
  o.auto_rebalance = false;
  auto c = MakeController(o);
  ASSERT_NE(c, nullptr);
  FeedSkew(300);
  // A fourth server that holds nothing yet (a 4-server placement where it is empty).
  nlohmann::json j = control_->placement().ToJson();
  j["num_servers"] = 4;
  for (auto& layer : j["layers"]) layer["servers"].push_back(nlohmann::json::array());
  auto p4 = place::Placement::FromJson(j, cfg_);
  ASSERT_TRUE(p4.ok()) << p4.status();
  StartServer(*p4, 3);
  EXPECT_EQ(servers_[3]->num_slots(), 0);

  auto added = c->AddServer(addresses_[3]);
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_EQ(added->trigger(), "server-joined");
  EXPECT_EQ(control_->servers().size(), 4u);
  EXPECT_GT(servers_[3]->num_slots(), 0);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(11);
  EXPECT_EQ(c->AddServer(addresses_[3]).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(c->AddServer("nonsense").status().code(), absl::StatusCode::kInvalidArgument);

  auto removed = c->RemoveServer(addresses_[1], "operator");
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(servers_[1]->num_slots(), 0);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(12);
  EXPECT_EQ(c->RemoveServer(addresses_[1], "operator").status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Two servers x 6 slots cannot hold 16 experts.
  auto too_few = c->RemoveServer(addresses_[0], "operator");
  EXPECT_EQ(too_few.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(too_few.status().message()), HasSubstr("cannot hold 16 experts"));
  // The emptied server comes back.
  auto back = c->AddServer(addresses_[1]);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_GT(servers_[1]->num_slots(), 0);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(13);
}

// A server restarted at its address (a pod restarted under its name) before
// the controller found it lost holds nothing: joining again used to answer
// ALREADY_EXISTS and every step that reached it failed (the soak found it).
// Now the join, or the next status poll, loads its slots again.
TEST_F(ControllerTest, ServerRestartedAtItsAddressGetsItsSlotsAgain) {
  StartCluster(3);
  ControllerOptions o;
  o.auto_rebalance = false;
  o.check_interval = absl::Milliseconds(100);
  auto c = MakeController(o);
  ASSERT_NE(c, nullptr);
  auto restart = [&](int index) {
    const int port = servers_[index]->port();
    servers_[index]->Shutdown(absl::ZeroDuration());
    servers_[index].reset();
    expert::ExpertServerOptions so;  // as dmoe-expert --join starts
    so.model_dir = dir_;
    so.start_empty = true;
    so.compute = core::ComputeType::kF32;
    so.threads = 1;
    auto s = expert::ExpertServer::Create(so);
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->Start("127.0.0.1", port).ok());
    servers_[index] = std::move(*s);
    ASSERT_EQ(servers_[index]->num_slots(), 0);
  };

  // 1. It joins again (dmoe-expert --join).
  restart(1);
  auto joined = c->AddServer(addresses_[1]);
  ASSERT_TRUE(joined.ok()) << joined.status();
  EXPECT_EQ(joined->trigger(), "server-restarted");
  EXPECT_GT(servers_[1]->num_slots(), 0);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(21);
  // Holding its slots, a second join is the usual ALREADY_EXISTS.
  EXPECT_EQ(c->AddServer(addresses_[1]).status().code(), absl::StatusCode::kAlreadyExists);

  // 2. It does not join: the controller's status poll finds it.
  c->Start();
  restart(2);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (servers_[2]->num_slots() == 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  c->Stop();
  EXPECT_GT(servers_[2]->num_slots(), 0);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(22);
}

TEST(DefaultSlotsPerServer, LetsOneServerLeave) {
  EXPECT_EQ(DefaultSlotsPerServer(16, 3, 6), 8);    // 2 x 8 = 16 (was 6: 2 x 6 < 16)
  EXPECT_EQ(DefaultSlotsPerServer(16, 2, 8), 16);   // the other one holds all
  EXPECT_EQ(DefaultSlotsPerServer(16, 1, 16), 16);  // nobody to leave to
  EXPECT_EQ(DefaultSlotsPerServer(16, 5, 4), 4);
  EXPECT_EQ(DefaultSlotsPerServer(256, 8, 32), 37);  // DeepSeek-V3 on 8 servers
  EXPECT_EQ(DefaultSlotsPerServer(16, 3, 12), 12);   // never below the starting placement
  for (int n = 2; n <= 20; ++n) {
    EXPECT_GE(int64_t{DefaultSlotsPerServer(64, n, 0)} * (n - 1), 64) << n;
  }
}

TEST_F(ControllerTest, LeaveRefusalNamesTheExpertsOnlyThatServerHolds) {
  auto p = place::Placement::Contiguous(cfg_, 3);
  ASSERT_TRUE(p.ok());
  const std::string why = LeaveRefusal(cfg_, *p, {true, true, true}, 1, 6);
  EXPECT_THAT(why, HasSubstr("2 other active expert servers x 6 slots cannot hold 16 experts"));
  EXPECT_THAT(why, HasSubstr(absl::StrCat("only copy of ", 5 * moe_layers_.size(),
                                          " experts (layer ", moe_layers_[0], " expert 5, ")));
  EXPECT_THAT(why, HasSubstr("--slots-per-server"));
  EXPECT_EQ(LeaveRefusal(cfg_, *p, {true, true, true}, 1, 8), "");
  // A server already gone counts neither as room nor as a replica.
  EXPECT_THAT(LeaveRefusal(cfg_, *p, {true, false, true, true}, 0, 6), HasSubstr("2 other"));
}

// Issue 13.3: with the default slot count, one of three servers can leave.
TEST_F(ControllerTest, DefaultSlotsAbsorbALeaveOfOneOfThreeServers) {
  StartCluster(3);
  ControllerOptions o;
  o.auto_rebalance = false;
  auto c = MakeController(o);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->slots_per_server(), 8);
  auto removed = c->RemoveServer(addresses_[1], "server-leaving");
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(servers_[1]->num_slots(), 0);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(21);
}

// Issue 13.3: a leave the others cannot absorb is refused, once (log, metric
// callback), the server is told and keeps its slots; it goes through once a
// server joins.
TEST_F(ControllerTest, LeaveThatCannotBeAbsorbedIsRefusedUntilAServerJoins) {
  StartCluster(3);
  ControllerOptions o;
  o.slots_per_server = 6;  // 2 x 6 < 16
  o.auto_rebalance = false;
  o.check_interval = absl::Milliseconds(50);
  auto c = MakeController(o);
  ASSERT_NE(c, nullptr);
  std::atomic<int> refused{0};
  c->set_on_leave_refused([&](const std::string& address) {
    EXPECT_EQ(address, addresses_[1]);
    ++refused;
  });
  c->Start();
  EXPECT_FALSE(servers_[1]->Leave(absl::ZeroDuration()));
  for (int i = 0; i < 200 && servers_[1]->leave_refused().empty(); ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_THAT(servers_[1]->leave_refused(), HasSubstr("cannot hold 16 experts"));
  EXPECT_THAT(servers_[1]->leave_refused(), HasSubstr("only copy of"));
  absl::SleepFor(absl::Milliseconds(300));  // more polls: still one refusal
  EXPECT_EQ(refused.load(), 1);
  EXPECT_GT(servers_[1]->num_slots(), 0);
  EXPECT_EQ(control_->placement().version(), 1u);
  ExpectComputeExact(22);

  // A fourth server joins: now 3 x 6 >= 16 without server 1, which leaves.
  nlohmann::json j = control_->placement().ToJson();
  j["num_servers"] = 4;
  for (auto& layer : j["layers"]) layer["servers"].push_back(nlohmann::json::array());
  auto p4 = place::Placement::FromJson(j, cfg_);
  ASSERT_TRUE(p4.ok()) << p4.status();
  StartServer(*p4, 3);
  ASSERT_TRUE(c->AddServer(addresses_[3]).ok());
  for (int i = 0; i < 500 && servers_[1]->num_slots() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(servers_[1]->num_slots(), 0);
  c->Stop();
  EXPECT_EQ(refused.load(), 1);
  ExpectServersHoldThePlacement();
  ExpectComputeExact(23);
}

TEST_F(ControllerTest, BadOptionsAreNamed) {
  StartCluster(2);
  ControllerOptions o;
  o.trigger = 0.9;
  auto c = PlacementController::Create(cfg_, window_.get(), control_, o);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("trigger"));
  o = ControllerOptions();
  o.slots_per_server = 5;  // 2 x 5 < 16
  c = PlacementController::Create(cfg_, window_.get(), control_, o);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("cannot hold"));
}

}  // namespace
}  // namespace dmoe::router
