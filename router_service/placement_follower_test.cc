// PlacementFollower, FetchPlacement and ApplyPlacement against a real
// in-process gRPC server implementing dmoe.v1.RouterService the way a router
// running --controller answers GetPlacement and RegisterRouter.
#include "router_service/placement_follower.h"

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "placement/placement.h"
#include "testing/ports.h"

namespace dmoe::router {
namespace {

core::ModelConfig SmallMoe() {
  core::ModelConfig cfg;
  cfg.num_hidden_layers = 2;
  cfg.first_k_dense_replace = 0;
  cfg.moe_layer_freq = 1;
  cfg.n_routed_experts = 4;
  cfg.num_experts_per_tok = 2;
  return cfg;
}

std::string PlacementJson(const core::ModelConfig& cfg, int servers, uint64_t version) {
  return place::Placement::Contiguous(cfg, servers, version)->ToJson().dump();
}

// The controller's router: answers GetPlacement and RegisterRouter with
// `answer` and records the registrations.
class ControllerRouter final : public v1::RouterService::Service {
 public:
  grpc::Status GetPlacement(grpc::ServerContext*, const v1::PlacementRequest*,
                            v1::PlacementResponse* out) override {
    absl::MutexLock lock(&mu);
    *out = answer;
    return grpc::Status::OK;
  }
  grpc::Status RegisterRouter(grpc::ServerContext*, const v1::RegisterRouterRequest* req,
                              v1::PlacementResponse* out) override {
    absl::MutexLock lock(&mu);
    registered.push_back(*req);
    *out = answer;
    return grpc::Status::OK;
  }
  std::vector<v1::RegisterRouterRequest> Registered() {
    absl::MutexLock lock(&mu);
    return registered;
  }

  absl::Mutex mu;
  v1::PlacementResponse answer;
  std::vector<v1::RegisterRouterRequest> registered;
};

std::unique_ptr<grpc::Server> Serve(grpc::Service* service, int* port) {
  grpc::ServerBuilder b;
  b.AddListeningPort(absl::StrCat("127.0.0.1:", *port), grpc::InsecureServerCredentials(), port);
  b.RegisterService(service);
  return b.BuildAndStart();
}

// The router's expert backend control, as RemoteExpertBackend keeps it.
class Control final : public RemoteExpertControl {
 public:
  absl::Status SwitchPlacement(place::Placement placement, std::vector<std::string> servers,
                               absl::Duration) override {
    absl::MutexLock lock(&mu_);
    ++switches;
    placement_ = std::move(placement);
    servers_ = std::move(servers);
    return absl::OkStatus();
  }
  place::Placement placement() const override {
    absl::MutexLock lock(&mu_);
    return placement_;
  }
  std::vector<std::string> servers() const override {
    absl::MutexLock lock(&mu_);
    return servers_;
  }
  size_t PooledBufferBytes() const override { return 0; }
  std::atomic<int> switches{0};

 private:
  mutable absl::Mutex mu_;
  place::Placement placement_;
  std::vector<std::string> servers_;
};

TEST(FetchPlacementTest, ReturnsTheControllersPlacement) {
  const core::ModelConfig cfg = SmallMoe();
  ControllerRouter router;
  router.answer.set_version(3);
  router.answer.set_placement_json(PlacementJson(cfg, 2, 3));
  router.answer.add_server_addresses("e0:1");
  router.answer.add_server_addresses("e1:1");
  int port = 0;
  auto server = Serve(&router, &port);
  ASSERT_NE(server, nullptr);
  absl::StatusOr<v1::PlacementResponse> r = FetchPlacement(absl::StrCat("127.0.0.1:", port));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->version(), 3u);
  EXPECT_EQ(r->server_addresses_size(), 2);
  EXPECT_EQ(r->placement_json(), router.answer.placement_json());
}

TEST(FetchPlacementTest, RetriesUntilTheRouterIsUp) {
  ControllerRouter router;
  router.answer.set_version(1);
  int port = testing::FreePort();
  std::unique_ptr<grpc::Server> server;
  std::thread late([&] {
    absl::SleepFor(absl::Milliseconds(600));
    server = Serve(&router, &port);
  });
  absl::StatusOr<v1::PlacementResponse> r =
      FetchPlacement(absl::StrCat("127.0.0.1:", port), 100, absl::Milliseconds(50));
  late.join();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->version(), 1u);
}

TEST(FetchPlacementTest, GivesUpWithTheFlagNamed) {
  const std::string addr = absl::StrCat("127.0.0.1:", testing::FreePort());
  const absl::Time start = absl::Now();
  absl::StatusOr<v1::PlacementResponse> r = FetchPlacement(addr, 3, absl::Milliseconds(20));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(
      r.status().message().rfind(absl::StrCat("--controller-router ", addr, ": no placement: "), 0),
      0u)
      << r.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
}

TEST(FetchPlacementTest, OtherErrorsAreNotRetried) {
  v1::RouterService::Service unimplemented;  // every method UNIMPLEMENTED
  int port = 0;
  auto server = Serve(&unimplemented, &port);
  const absl::Time start = absl::Now();
  absl::StatusOr<v1::PlacementResponse> r =
      FetchPlacement(absl::StrCat("127.0.0.1:", port), 100, absl::Seconds(1));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));  // not 100 tries a second apart
}

TEST(ApplyPlacementTest, SwitchesOnlyToNewerValidPlacements) {
  const core::ModelConfig cfg = SmallMoe();
  Control control;
  ASSERT_TRUE(
      control.SwitchPlacement(*place::Placement::Contiguous(cfg, 1, 1), {"e0:1"}, absl::Seconds(1))
          .ok());
  EXPECT_TRUE(
      ApplyPlacement(cfg, control, nullptr, 2, PlacementJson(cfg, 2, 2), {"a:1", "b:1"}).ok());
  EXPECT_EQ(control.placement().version(), 2u);
  EXPECT_EQ(control.servers(), (std::vector<std::string>{"a:1", "b:1"}));
  EXPECT_EQ(control.switches, 2);
  // The same version again, or an older one: nothing to do.
  EXPECT_TRUE(
      ApplyPlacement(cfg, control, nullptr, 2, PlacementJson(cfg, 2, 2), {"x:1", "y:1"}).ok());
  EXPECT_TRUE(ApplyPlacement(cfg, control, nullptr, 1, PlacementJson(cfg, 1, 1), {"x:1"}).ok());
  EXPECT_EQ(control.switches, 2);
  const absl::Status mismatch =
      ApplyPlacement(cfg, control, nullptr, 5, PlacementJson(cfg, 2, 4), {"a:1", "b:1"});
  EXPECT_EQ(mismatch.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(mismatch.message(), "placement version 5 but its JSON says 4");
  EXPECT_FALSE(ApplyPlacement(cfg, control, nullptr, 6, "{not json", {"a:1"}).ok());
  EXPECT_EQ(control.placement().version(), 2u);
}

TEST(PlacementFollowerTest, RegistersAndAppliesNewerPlacements) {
  const core::ModelConfig cfg = SmallMoe();
  Control control;
  ASSERT_TRUE(
      control.SwitchPlacement(*place::Placement::Contiguous(cfg, 1, 1), {"e0:1"}, absl::Seconds(1))
          .ok());
  ControllerRouter router;
  router.answer.set_version(1);
  router.answer.set_placement_json(PlacementJson(cfg, 1, 1));
  router.answer.add_server_addresses("e0:1");
  int port = 0;
  auto server = Serve(&router, &port);
  ASSERT_NE(server, nullptr);

  std::atomic<int> applies{0};
  PlacementFollower follower(
      {.controller_router = absl::StrCat("127.0.0.1:", port),
       .advertise = "me:4242",
       .interval = absl::Milliseconds(50)},
      [&control] { return control.placement().version(); },
      [&](const v1::PlacementResponse& r) {
        ++applies;
        return ApplyPlacement(cfg, control, nullptr, r.version(), r.placement_json(),
                              {r.server_addresses().begin(), r.server_addresses().end()});
      });
  follower.Start();
  auto wait_for = [](auto done) {
    for (absl::Time end = absl::Now() + absl::Seconds(20); absl::Now() < end && !done();) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    return done();
  };
  ASSERT_TRUE(wait_for([&] { return follower.registrations() >= 2; }));
  EXPECT_EQ(applies, 0);  // same version: nothing to apply
  {
    auto reg = router.Registered();
    EXPECT_EQ(reg[0].address(), "me:4242");
    EXPECT_EQ(reg[0].placement_version(), 1u);
  }
  // A re-placement on the controller: the next registration brings it.
  {
    absl::MutexLock lock(&router.mu);
    router.answer.set_version(2);
    router.answer.set_placement_json(PlacementJson(cfg, 2, 2));
    router.answer.add_server_addresses("e1:1");
  }
  ASSERT_TRUE(wait_for([&] { return control.placement().version() == 2; }));
  EXPECT_EQ(control.servers(), (std::vector<std::string>{"e0:1", "e1:1"}));
  const int64_t after = follower.registrations();
  ASSERT_TRUE(wait_for([&] { return follower.registrations() >= after + 2; }));
  EXPECT_EQ(applies, 1);
  EXPECT_EQ(router.Registered().back().placement_version(), 2u);

  // A placement that does not apply is retried on every registration.
  {
    absl::MutexLock lock(&router.mu);
    router.answer.set_version(3);
    router.answer.set_placement_json("{}");
  }
  ASSERT_TRUE(wait_for([&] { return applies >= 3; }));
  EXPECT_EQ(control.placement().version(), 2u);

  const absl::Time stop = absl::Now();
  follower.Stop();
  EXPECT_LT(absl::Now() - stop, absl::Seconds(2));
  const size_t n = router.Registered().size();
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(router.Registered().size(), n);  // stopped: no more registrations
  follower.Stop();                           // idempotent
}

TEST(PlacementFollowerTest, StopsPromptlyBetweenRegistrations) {
  ControllerRouter router;
  int port = 0;
  auto server = Serve(&router, &port);
  PlacementFollower follower(
      {.controller_router = absl::StrCat("127.0.0.1:", port),
       .advertise = "me:1",
       .interval = absl::Seconds(30)},
      [] { return uint64_t{0}; }, [](const v1::PlacementResponse&) { return absl::OkStatus(); });
  follower.Start();
  for (absl::Time end = absl::Now() + absl::Seconds(20);
       absl::Now() < end && follower.registrations() == 0;) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(follower.registrations(), 1);
  const absl::Time stop = absl::Now();
  follower.Stop();
  EXPECT_LT(absl::Now() - stop, absl::Seconds(2));
}

}  // namespace
}  // namespace dmoe::router
