// The gateway's Prometheus metrics (prefix moe_gateway_), registered in a
// registry the caller owns and serves on /metrics.
//
//   moe_gateway_http_requests_total{endpoint,code}   HTTP requests by route and status
//   moe_gateway_grpc_requests_total{method,code}     gRPC proxy calls by method and status
//   moe_gateway_request_duration_seconds{endpoint}   latency, to the last byte (histogram)
//   moe_gateway_time_to_first_token_seconds          generation requests (histogram)
//   moe_gateway_prompt_tokens_total / moe_gateway_generated_tokens_total
//   moe_gateway_inflight_requests                    generations in flight (HTTP + gRPC)
//   moe_gateway_client_disconnects_total             streams whose client went away (upstream
//   cancelled) moe_gateway_router_healthy{router}               1 when the router's last GetLoad
//   answered moe_gateway_router_load{router}                  its active + queued sequences
//
// Label values are bounded: `endpoint` is one of the routes (unknown paths are
// "other"), `router` one of the configured addresses.
//
// Thread safety: every method is thread-safe.
#ifndef DMOE_GATEWAY_METRICS_H_
#define DMOE_GATEWAY_METRICS_H_

#include <string>
#include <vector>

#include "absl/time/time.h"
#include "gateway/router_pool.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace dmoe::gateway {

class GatewayMetrics {
 public:
  explicit GatewayMetrics(prometheus::Registry& registry);

  void RecordHttp(const std::string& endpoint, int code, absl::Duration latency);
  void RecordGrpc(const std::string& method, const std::string& code, absl::Duration latency);
  void RecordTimeToFirstToken(absl::Duration ttft) { ttft_.Observe(absl::ToDoubleSeconds(ttft)); }
  void AddPromptTokens(double n) { prompt_tokens_.Increment(n); }
  void AddGeneratedTokens(double n) { generated_tokens_.Increment(n); }
  void RecordClientDisconnect() { disconnects_.Increment(); }
  prometheus::Gauge& inflight() { return inflight_; }
  void SetRouterStates(const std::vector<RouterState>& states);

 private:
  prometheus::Family<prometheus::Counter>& http_requests_;
  prometheus::Family<prometheus::Counter>& grpc_requests_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Histogram& ttft_;
  prometheus::Counter& prompt_tokens_;
  prometheus::Counter& generated_tokens_;
  prometheus::Counter& disconnects_;
  prometheus::Gauge& inflight_;
  prometheus::Family<prometheus::Gauge>& router_healthy_;
  prometheus::Family<prometheus::Gauge>& router_load_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_METRICS_H_
