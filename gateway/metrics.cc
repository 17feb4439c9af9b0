#include "gateway/metrics.h"

namespace dmoe::gateway {
namespace {

// From 5 ms (a rejected request) to the 600 s default request deadline.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
}

}  // namespace

GatewayMetrics::GatewayMetrics(prometheus::Registry& registry)
    : http_requests_(prometheus::BuildCounter()
                         .Name("moe_gateway_http_requests_total")
                         .Help("HTTP requests by endpoint and status code")
                         .Register(registry)),
      grpc_requests_(prometheus::BuildCounter()
                         .Name("moe_gateway_grpc_requests_total")
                         .Help("gRPC proxy calls by method and status code")
                         .Register(registry)),
      duration_(prometheus::BuildHistogram()
                    .Name("moe_gateway_request_duration_seconds")
                    .Help("Request latency to the last byte, by endpoint")
                    .Register(registry)),
      ttft_(prometheus::BuildHistogram()
                .Name("moe_gateway_time_to_first_token_seconds")
                .Help("Time from a generation request to its first token")
                .Register(registry)
                .Add({}, LatencyBuckets())),
      prompt_tokens_(prometheus::BuildCounter()
                         .Name("moe_gateway_prompt_tokens_total")
                         .Help("Prompt tokens of completed generations")
                         .Register(registry)
                         .Add({})),
      generated_tokens_(prometheus::BuildCounter()
                            .Name("moe_gateway_generated_tokens_total")
                            .Help("Tokens generated and sent to clients")
                            .Register(registry)
                            .Add({})),
      disconnects_(prometheus::BuildCounter()
                       .Name("moe_gateway_client_disconnects_total")
                       .Help("Streams whose client went away; the upstream call was cancelled")
                       .Register(registry)
                       .Add({})),
      inflight_(prometheus::BuildGauge()
                    .Name("moe_gateway_inflight_requests")
                    .Help("Generation requests in flight (HTTP and gRPC)")
                    .Register(registry)
                    .Add({})),
      router_healthy_(prometheus::BuildGauge()
                          .Name("moe_gateway_router_healthy")
                          .Help("1 when the router's last GetLoad poll answered, else 0")
                          .Register(registry)),
      router_load_(prometheus::BuildGauge()
                       .Name("moe_gateway_router_load")
                       .Help("Active + queued sequences the router last reported")
                       .Register(registry)) {}

void GatewayMetrics::RecordHttp(const std::string& endpoint, int code, absl::Duration latency) {
  http_requests_.Add({{"endpoint", endpoint}, {"code", std::to_string(code)}}).Increment();
  duration_.Add({{"endpoint", endpoint}}, LatencyBuckets()).Observe(absl::ToDoubleSeconds(latency));
}

void GatewayMetrics::RecordGrpc(const std::string& method, const std::string& code,
                                absl::Duration latency) {
  grpc_requests_.Add({{"method", method}, {"code", code}}).Increment();
  duration_.Add({{"endpoint", "grpc:" + method}}, LatencyBuckets())
      .Observe(absl::ToDoubleSeconds(latency));
}

void GatewayMetrics::SetRouterStates(const std::vector<RouterState>& states) {
  for (const RouterState& s : states) {
    router_healthy_.Add({{"router", s.address}}).Set(s.healthy ? 1 : 0);
    router_load_.Add({{"router", s.address}})
        .Set(static_cast<double>(s.active_sequences) + s.queued_requests);
  }
}

}  // namespace dmoe::gateway
