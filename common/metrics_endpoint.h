// The Prometheus /metrics endpoint of the service binaries that serve one
// (dmoe-router, dmoe-expert): the gateway's HTTP/1.1 server (common/http1)
// on host:port, serialising one Collectable in the text exposition format.
// Not prometheus-cpp's civetweb Exposer: it fails to start in binaries that
// also link the CUDA libraries.
//
// Header-only on purpose: dmoe_tools is also built without the services (and
// then without prometheus-cpp); only the service mains include this, and they
// link prometheus-cpp through their service libraries.
//
// Thread safety: MetricsEndpoint's methods are thread-safe; RefreshingCollectable
// calls `refresh` from the HTTP request threads, possibly concurrently.
#ifndef DMOE_COMMON_METRICS_ENDPOINT_H_
#define DMOE_COMMON_METRICS_ENDPOINT_H_

#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/http1/server.h"
#include "common/service_main.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"

namespace dmoe::common {

// Serves `inner` (usually the process's Registry) after calling `refresh`,
// which brings the gauges computed from state (windows, queues) up to date:
// they are computed when Prometheus asks, not on a timer.
class RefreshingCollectable final : public prometheus::Collectable {
 public:
  RefreshingCollectable(std::shared_ptr<prometheus::Collectable> inner,
                        std::function<void()> refresh)
      : inner_(std::move(inner)), refresh_(std::move(refresh)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    if (refresh_) refresh_();
    return inner_->Collect();
  }

 private:
  const std::shared_ptr<prometheus::Collectable> inner_;
  const std::function<void()> refresh_;
};

class MetricsEndpoint {
 public:
  // Listens on host:port (port 0 = any free port; IPv6 hosts as "::1") and
  // serves `collectable` on GET /metrics (404 elsewhere, 405 for another
  // method). Unavailable "metrics: cannot listen on 127.0.0.1:9190: why" when
  // the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& host, int port, std::shared_ptr<prometheus::Collectable> collectable) {
    http1::ServerOptions options;
    options.threads = 2;
    options.max_connections = 256;
    options.limits.max_body_bytes = 64 << 10;
    std::unique_ptr<MetricsEndpoint> e(new MetricsEndpoint);
    e->server_ = std::make_unique<http1::Server>(
        options,
        [c = std::move(collectable)](const http1::Request& req, http1::Responder& r) {
          const http1::Headers text = {{"Content-Type", "text/plain; charset=utf-8"}};
          if (req.path != "/metrics") return void(r.Send(404, text, "not found: try /metrics\n"));
          if (req.method != "GET" && req.method != "HEAD") {
            return void(r.Send(405, {{"Allow", "GET, HEAD"}, text[0]}, "GET /metrics\n"));
          }
          r.Send(200, {{"Content-Type", "text/plain; version=0.0.4; charset=utf-8"}},
                 prometheus::TextSerializer().Serialize(c->Collect()));
        },
        nullptr);
    absl::StatusOr<int> bound = e->server_->Start(host, port);
    if (!bound.ok()) {
      const bool v6 = host.find(':') != std::string::npos && host.front() != '[';
      return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", v6 ? "[" : "", host,
                                                 v6 ? "]" : "", ":", port, ": ",
                                                 bound.status().message()));
    }
    e->port_ = *bound;
    return e;
  }
  ~MetricsEndpoint() { server_->Stop(); }

  // The bound port.
  int port() const { return port_; }

 private:
  MetricsEndpoint() = default;
  std::unique_ptr<http1::Server> server_;
  int port_ = 0;
};

// --expert-metrics: "per-expert" -> true (series per (layer, expert)),
// "per-layer" -> false (expert="all"); InvalidArgument otherwise.
inline absl::StatusOr<bool> ParseExpertMetricsFlag(const std::string& value) {
  if (value == "per-expert") return true;
  if (value == "per-layer") return false;
  return absl::InvalidArgumentError(
      absl::StrCat("--expert-metrics must be per-expert or per-layer, got '", value, "'"));
}

// The metrics flags' common start-up: serves `collectable` on host:port and
// writes the bound port to `port_file` (when not empty, like --port-file).
// When neither the port nor a port file was given explicitly and the default
// port is taken, e.g. by a second server on the same host, prints a warning
// and returns null: the service runs without /metrics. An explicit port that
// cannot be bound, or a port file that cannot be written, is an error.
inline absl::StatusOr<std::unique_ptr<MetricsEndpoint>> ServeMetrics(
    const char* name, const std::string& host, int port, bool port_explicit,
    const std::string& port_file, std::shared_ptr<prometheus::Collectable> collectable) {
  absl::StatusOr<std::unique_ptr<MetricsEndpoint>> e =
      MetricsEndpoint::Start(host, port, std::move(collectable));
  if (!e.ok()) {
    if (port_explicit || !port_file.empty()) return e.status();
    std::fprintf(stderr, "%s: warning: %s; serving without /metrics (give --metrics-port)\n", name,
                 std::string(e.status().message()).c_str());
    return std::unique_ptr<MetricsEndpoint>();
  }
  if (!port_file.empty()) {
    absl::Status st = WritePortFile(port_file, (*e)->port());
    if (!st.ok()) return st;
  }
  return e;
}

}  // namespace dmoe::common

#endif  // DMOE_COMMON_METRICS_ENDPOINT_H_
