#include "router_service/readiness.h"

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/grpc_status.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmoe::router {

absl::Status CheckServable(const core::ModelConfig& cfg, const place::Placement& placement,
                           const std::vector<std::string>& servers,
                           const std::vector<absl::Status>& live) {
  int64_t missing = 0;
  std::string first;
  std::vector<int32_t> first_replicas;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int32_t e = 0; e < cfg.n_routed_experts; ++e) {
      const std::vector<int32_t>& replicas = placement.Replicas(l, e);
      bool ok = false;
      for (int32_t r : replicas) ok |= r < static_cast<int>(live.size()) && live[r].ok();
      if (ok) continue;
      if (++missing == 1) {
        first = absl::StrCat("layer ", l, " expert ", e);
        first_replicas = replicas;
      }
    }
  }
  if (missing == 0) return absl::OkStatus();
  std::vector<std::string> why;
  for (int32_t r : first_replicas) {
    const std::string address = r < static_cast<int>(servers.size()) ? servers[r] : "?";
    const std::string err =
        r < static_cast<int>(live.size()) ? std::string(live[r].message()) : "not probed";
    why.push_back(absl::StrCat("server ", r, " (", address, "): ", err));
  }
  if (why.empty()) why.push_back("no server holds it");
  return absl::UnavailableError(absl::StrCat("cannot serve a token: ", first,
                                             " has no live expert server (", missing,
                                             " experts in all; ", absl::StrJoin(why, "; "), ")"));
}

struct ReadinessMonitor::Channel {
  std::unique_ptr<v1::ExpertService::Stub> stub;
};

ReadinessMonitor::ReadinessMonitor(const core::ModelConfig& cfg, RemoteExpertControl* control,
                                   Probe probe, std::function<void(const absl::Status&)> on_change,
                                   ReadinessOptions options)
    : cfg_(cfg),
      control_(control),
      probe_(probe ? std::move(probe) : Probe([this](const std::string& a, absl::Duration t) {
        return DefaultProbe(a, t);
      })),
      on_change_(std::move(on_change)),
      options_(options) {}

ReadinessMonitor::~ReadinessMonitor() { Stop(); }

void ReadinessMonitor::Start() {
  if (thread_.joinable()) return;
  CheckNow();
  thread_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(options_.interval)) CheckNow();
  });
}

void ReadinessMonitor::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

absl::Status ReadinessMonitor::Ready() const {
  absl::MutexLock lock(&mu_);
  return ready_;
}

absl::Status ReadinessMonitor::DefaultProbe(const std::string& address, absl::Duration timeout) {
  std::shared_ptr<Channel> ch;
  {
    absl::MutexLock lock(&mu_);
    std::shared_ptr<Channel>& slot = channels_[address];
    if (!slot) {
      // Reconnect quickly: a server that comes back must make the router
      // ready within about a second, not after gRPC's default back-off
      // (up to 2 minutes).
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
      args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
      args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
      slot = std::make_shared<Channel>();
      slot->stub = v1::ExpertService::NewStub(
          grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
    }
    ch = slot;
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::ServerStatusResponse resp;
  const grpc::Status st = ch->stub->GetStatus(&ctx, v1::ServerStatusRequest(), &resp);
  return common::FromGrpc(st);
}

absl::Status ReadinessMonitor::CheckNow() {
  absl::MutexLock one(&check_mu_);
  const place::Placement placement = control_->placement();
  const std::vector<std::string> servers = control_->servers();
  const int n = static_cast<int>(servers.size());
  std::vector<absl::Status> live(n);
  {
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&, i] { live[i] = probe_(servers[i], options_.probe_timeout); });
    }
    for (std::thread& t : threads) t.join();
  }
  absl::Status now = CheckServable(cfg_, placement, servers, live);
  bool changed;
  {
    absl::MutexLock lock(&mu_);
    changed = !checked_ || now.ok() != ready_.ok();
    checked_ = true;
    ready_ = now;
  }
  if (changed) {
    std::fprintf(stderr, "dmoe-router: %s%s\n", now.ok() ? "ready" : "NOT ready: ",
                 now.ok() ? " (every routed expert has a live expert server)"
                          : std::string(now.message()).c_str());
    if (on_change_) on_change_(now);
  }
  return now;
}

}  // namespace dmoe::router
