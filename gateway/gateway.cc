#include "gateway/gateway.h"

#include <chrono>
#include <utility>

#include "grpcpp/health_check_service_interface.h"

namespace dmoe::gateway {

absl::StatusOr<std::unique_ptr<Gateway>> Gateway::Start(GatewayOptions options) {
  if (options.max_inflight < 1) {
    return absl::InvalidArgumentError("max_inflight must be at least 1");
  }
  std::unique_ptr<Gateway> g(new Gateway());
  g->registry_ = std::make_shared<prometheus::Registry>();
  g->metrics_ = std::make_unique<GatewayMetrics>(*g->registry_);
  g->limiter_ = std::make_unique<InflightLimiter>(options.max_inflight, &g->metrics_->inflight());
  RouterPoolOptions po;
  po.addresses = options.routers;
  po.poll_interval = options.poll_interval;
  po.poll_timeout = options.poll_timeout;
  absl::StatusOr<std::unique_ptr<RouterPool>> pool = RouterPool::Create(std::move(po));
  if (!pool.ok()) return pool.status();
  g->pool_ = *std::move(pool);
  g->metrics_->SetRouterStates(g->pool_->Snapshot());

  g->http_ = std::make_unique<HttpServer>(*g->pool_, *g->limiter_, *g->metrics_, *g->registry_,
                                          options.http);
  absl::StatusOr<int> http_port = g->http_->Start(options.host, options.http_port);
  if (!http_port.ok()) return http_port.status();
  g->http_port_ = *http_port;

  if (options.grpc_port >= 0) {
    GrpcProxyOptions go;
    go.request_timeout = options.http.request_timeout;
    g->proxy_ = std::make_unique<RouterProxyService>(*g->pool_, *g->limiter_, *g->metrics_, go);
    absl::StatusOr<StartedGrpcServer> grpc =
        StartGatewayGrpcServer(g->proxy_.get(), options.host, options.grpc_port);
    if (!grpc.ok()) return grpc.status();
    g->grpc_ = std::move(grpc->server);
    g->grpc_port_ = grpc->port;
  }

  // After every poll: router gauges, and gRPC health SERVING iff a router is.
  Gateway* self = g.get();
  auto on_poll = [self](const std::vector<RouterState>& states) {
    self->metrics_->SetRouterStates(states);
    if (self->grpc_ == nullptr) return;
    bool any = false;
    for (const RouterState& s : states) any = any || s.healthy;
    if (auto* health = self->grpc_->GetHealthCheckService()) {
      const bool serving = any && !self->draining_;
      health->SetServingStatus(serving);
      health->SetServingStatus(v1::RouterService::service_full_name(), serving);
    }
  };
  on_poll(g->pool_->Snapshot());
  g->pool_->SetPollListener(std::move(on_poll));
  return g;
}

void Gateway::Shutdown(absl::Duration grace) {
  if (shut_down_) return;
  shut_down_ = true;
  draining_ = true;
  http_->SetDraining();
  if (grpc_ != nullptr) {
    if (auto* health = grpc_->GetHealthCheckService()) health->Shutdown();
  }
  limiter_->WaitForIdle(grace);
  pool_->Close();  // cancels what is still in flight; handlers then finish quickly
  http_->Stop();
  if (grpc_ != nullptr) grpc_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

Gateway::~Gateway() {
  if (http_ != nullptr) Shutdown(absl::ZeroDuration());
  // The poller (and its listener, which touches grpc_ and metrics_) goes first.
  pool_.reset();
  http_.reset();
  grpc_.reset();
  proxy_.reset();
}

}  // namespace dmoe::gateway
