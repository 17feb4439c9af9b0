// dmoe.v1.RouterService served by the gateway: a pass-through to the routers.
//
// Generate goes to the least-loaded healthy router (with the same failover
// before the first token as HTTP, see generation.h) and relays the stream;
// when the client cancels or its deadline passes, the upstream call is
// cancelled within `cancel_poll`. Forward goes to the least-loaded router too.
// GetLoad answers the sum of the healthy routers' last reported loads. Every
// upstream call has a deadline: the client's, capped at `request_timeout`.
// Generate and Forward count against the gateway's in-flight cap
// (RESOURCE_EXHAUSTED beyond it).
//
// Thread safety: thread-safe (a synchronous service: one gRPC thread per call).
#ifndef DMOE_GATEWAY_GRPC_PROXY_H_
#define DMOE_GATEWAY_GRPC_PROXY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "gateway/inflight_limiter.h"
#include "gateway/metrics.h"
#include "gateway/router_pool.h"
#include "grpcpp/grpcpp.h"

namespace dmoe::gateway {

struct GrpcProxyOptions {
  absl::Duration request_timeout = absl::Seconds(600);
  absl::Duration cancel_poll = absl::Milliseconds(100);
};

class RouterProxyService final : public v1::RouterService::Service {
 public:
  // Everything passed in must outlive the service.
  RouterProxyService(RouterPool& pool, InflightLimiter& limiter, GatewayMetrics& metrics,
                     GrpcProxyOptions options)
      : pool_(pool), limiter_(limiter), metrics_(metrics), options_(options) {}

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Forward(grpc::ServerContext* context, const v1::ForwardRequest* request,
                       v1::ForwardResponse* response) override;
  grpc::Status GetLoad(grpc::ServerContext* context, const v1::RouterLoadRequest* request,
                       v1::RouterLoadResponse* response) override;

 private:
  grpc::Status DoGenerate(grpc::ServerContext* context, const v1::GenerateRequest& request,
                          grpc::ServerWriter<v1::GenerateResponse>* writer);
  grpc::Status DoForward(const grpc::ServerContext& context, const v1::ForwardRequest& request,
                         v1::ForwardResponse* response);
  absl::Time Deadline(const grpc::ServerContext& context) const;

  RouterPool& pool_;
  InflightLimiter& limiter_;
  GatewayMetrics& metrics_;
  const GrpcProxyOptions options_;
};

// A started gRPC server with `service`, the standard health service ("" and
// "dmoe.v1.RouterService", SERVING until told otherwise) and reflection, on
// host:port (0 = any free port). UNAVAILABLE when the address cannot be bound.
struct StartedGrpcServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};
absl::StatusOr<StartedGrpcServer> StartGatewayGrpcServer(RouterProxyService* service,
                                                         const std::string& host, int port);

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GRPC_PROXY_H_
