#include "router_service/placement_follower.h"

#include <chrono>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "placement/placement.h"

namespace dmoe::router {

absl::StatusOr<v1::PlacementResponse> FetchPlacement(const std::string& router, int attempts,
                                                     absl::Duration retry_interval) {
  auto stub =
      v1::RouterService::NewStub(grpc::CreateChannel(router, grpc::InsecureChannelCredentials()));
  grpc::Status st;
  for (int attempt = 0; attempt < attempts; ++attempt) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::PlacementResponse r;
    st = stub->GetPlacement(&ctx, v1::PlacementRequest(), &r);
    if (st.ok()) return r;
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE &&
        st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      break;
    }
    if (attempt + 1 < attempts) absl::SleepFor(retry_interval);
  }
  return absl::UnavailableError(
      absl::StrCat("--controller-router ", router, ": no placement: ", st.error_message()));
}

absl::Status ApplyPlacement(const core::ModelConfig& cfg, RemoteExpertControl& control,
                            RouterMetrics* metrics, uint64_t version, const std::string& json,
                            std::vector<std::string> servers) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, false);
  absl::StatusOr<place::Placement> p = place::Placement::FromJson(j, cfg);
  if (!p.ok()) return p.status();
  if (p->version() != version) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement version ", version, " but its JSON says ", p->version()));
  }
  if (control.placement().version() >= version) return absl::OkStatus();
  DMOE_RETURN_IF_ERROR(control.SwitchPlacement(*p, std::move(servers), absl::Seconds(60)));
  if (metrics != nullptr) {
    metrics->SetServers(control.servers());
    metrics->SetPlacement(control.placement());
  }
  std::fprintf(stderr, "dmoe-router: switched to placement version %llu\n",
               static_cast<unsigned long long>(version));
  return absl::OkStatus();
}

PlacementFollower::PlacementFollower(PlacementFollowerOptions options,
                                     std::function<uint64_t()> current_version, Apply apply)
    : options_(std::move(options)),
      current_version_(std::move(current_version)),
      apply_(std::move(apply)) {}

PlacementFollower::~PlacementFollower() { Stop(); }

void PlacementFollower::Start() {
  absl::MutexLock lock(&mu_);
  if (thread_.joinable() || stopping_) return;
  thread_ = std::thread([this] { Run(); });
}

void PlacementFollower::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void PlacementFollower::Run() {
  auto stub = v1::RouterService::NewStub(
      grpc::CreateChannel(options_.controller_router, grpc::InsecureChannelCredentials()));
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
    v1::RegisterRouterRequest req;
    req.set_address(options_.advertise);
    req.set_placement_version(current_version_());
    v1::PlacementResponse r;
    grpc::Status st = stub->RegisterRouter(&ctx, req, &r);
    if (st.ok()) ++registrations_;
    if (st.ok() && r.version() > current_version_()) {
      if (absl::Status applied = apply_(r); !applied.ok()) {
        std::fprintf(stderr, "dmoe-router: placement version %llu from %s: %s\n",
                     static_cast<unsigned long long>(r.version()),
                     options_.controller_router.c_str(), std::string(applied.message()).c_str());
      }
    }
    absl::MutexLock lock(&mu_);
    if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.interval)) return;
  }
}

}  // namespace dmoe::router
