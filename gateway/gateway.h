// A whole gateway in one object: the router pool, the HTTP API, the optional
// gRPC pass-through, the in-flight cap and the metrics registry. main.cc and
// the tests run it the same way.
//
// Thread safety: Start/Shutdown/destructor from one controlling thread; the
// accessors are thread-safe.
#ifndef DMOE_GATEWAY_GATEWAY_H_
#define DMOE_GATEWAY_GATEWAY_H_

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gateway/grpc_proxy.h"
#include "gateway/http_server.h"
#include "gateway/inflight_limiter.h"
#include "gateway/metrics.h"
#include "gateway/router_pool.h"
#include "prometheus/registry.h"

namespace dmoe::gateway {

struct GatewayOptions {
  std::vector<std::string> routers;  // "host:port", at least one
  std::string host = "127.0.0.1";
  int http_port = 0;   // 0 = any free port
  int grpc_port = -1;  // -1 = no gRPC server; 0 = any free port
  int max_inflight = 256;
  absl::Duration poll_interval = absl::Milliseconds(200);
  absl::Duration poll_timeout = absl::Seconds(1);
  HttpServerOptions http;  // model name, body limit, threads, request timeout, ...
};

class Gateway {
 public:
  // Opens the router pool (one poll round first), then the HTTP server and, if
  // asked, the gRPC server. INVALID_ARGUMENT for bad options (a router address
  // that is not HOST:PORT), UNAVAILABLE when a port cannot be bound.
  static absl::StatusOr<std::unique_ptr<Gateway>> Start(GatewayOptions options);
  ~Gateway();  // Shutdown(0) when not done yet

  int http_port() const { return http_port_; }
  int grpc_port() const { return grpc_port_; }  // 0 without a gRPC server
  RouterPool& routers() { return *pool_; }
  prometheus::Registry& registry() { return *registry_; }

  // Graceful stop: new requests are refused (503 / UNAVAILABLE, health turns
  // NOT_SERVING), requests in flight get up to `grace`, then the rest are
  // cancelled upstream and both servers stop. Idempotent.
  void Shutdown(absl::Duration grace);

 private:
  Gateway() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<GatewayMetrics> metrics_;
  std::unique_ptr<InflightLimiter> limiter_;
  std::unique_ptr<RouterPool> pool_;
  std::unique_ptr<HttpServer> http_;
  std::unique_ptr<RouterProxyService> proxy_;
  std::unique_ptr<grpc::Server> grpc_;
  int http_port_ = 0;
  int grpc_port_ = 0;
  std::atomic<bool> draining_{false};
  bool shut_down_ = false;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GATEWAY_H_
