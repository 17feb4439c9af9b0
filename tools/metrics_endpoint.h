// The Prometheus /metrics endpoint of the service binaries that serve one
// (dmoe-router, dmoe-expert): prometheus-cpp's pull Exposer (civetweb) on
// host:port, serving one Collectable.
//
// Header-only on purpose: dmoe_tools is also built without the services (and
// then without prometheus-cpp); only the service mains include this, and they
// link prometheus-cpp through their service libraries.
//
// Thread safety: MetricsEndpoint's methods are thread-safe; RefreshingCollectable
// calls `refresh` from civetweb's request threads, possibly concurrently.
#ifndef DMOE_TOOLS_METRICS_ENDPOINT_H_
#define DMOE_TOOLS_METRICS_ENDPOINT_H_

#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"
#include "prometheus/metric_family.h"
#include "tools/service_main.h"

namespace dmoe::tools {

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
  // serves `collectable` on /metrics. Unavailable "metrics: cannot listen on
  // 127.0.0.1:9190" when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& host, int port, std::shared_ptr<prometheus::Collectable> collectable) {
    const std::string addr = host.find(':') != std::string::npos && host.front() != '['
                                 ? absl::StrCat("[", host, "]:", port)
                                 : absl::StrCat(host, ":", port);
    std::unique_ptr<MetricsEndpoint> e(new MetricsEndpoint);
    try {
      // civetweb reports a failed bind by throwing from the constructor.
      e->exposer_ = std::make_unique<prometheus::Exposer>(addr, /*num_threads=*/2);
    } catch (const std::exception& ex) {
      return absl::UnavailableError(
          absl::StrCat("metrics: cannot listen on ", addr, " (", ex.what(), ")"));
    }
    const std::vector<int> ports = e->exposer_->GetListeningPorts();
    if (ports.empty() || ports[0] <= 0) {
      return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", addr));
    }
    e->port_ = ports[0];
    e->collectable_ = std::move(collectable);
    e->exposer_->RegisterCollectable(e->collectable_);
    return e;
  }

  // The bound port.
  int port() const { return port_; }

 private:
  MetricsEndpoint() = default;
  std::shared_ptr<prometheus::Collectable> collectable_;  // the Exposer holds a weak_ptr
  std::unique_ptr<prometheus::Exposer> exposer_;
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
    std::fprintf(stderr, "%s: warning: %s; serving without /metrics (give --metrics-port)\n",
                 name, std::string(e.status().message()).c_str());
    return std::unique_ptr<MetricsEndpoint>();
  }
  if (!port_file.empty()) {
    absl::Status st = WritePortFile(port_file, (*e)->port());
    if (!st.ok()) return st;
  }
  return e;
}

}  // namespace dmoe::tools

#endif  // DMOE_TOOLS_METRICS_ENDPOINT_H_
