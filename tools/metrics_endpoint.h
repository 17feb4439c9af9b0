// The Prometheus /metrics endpoint of the service binaries that serve one
// (dmoe-router, dmoe-expert): a small cpp-httplib server on host:port that
// serialises one Collectable in the text exposition format (the gateway uses
// the same library for its API). Not prometheus-cpp's civetweb Exposer: it
// fails to start in binaries that also link the CUDA libraries.
//
// Header-only on purpose: dmoe_tools is also built without the services (and
// then without prometheus-cpp); only the service mains include this, and they
// link prometheus-cpp through their service libraries.
//
// Thread safety: MetricsEndpoint's methods are thread-safe; RefreshingCollectable
// calls `refresh` from the HTTP request threads, possibly concurrently.
#ifndef DMOE_TOOLS_METRICS_ENDPOINT_H_
#define DMOE_TOOLS_METRICS_ENDPOINT_H_

#include <httplib.h>

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
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"
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
    std::unique_ptr<MetricsEndpoint> e(new MetricsEndpoint);
    e->collectable_ = std::move(collectable);
    e->server_.new_task_queue = [] { return new httplib::ThreadPool(2); };
    // SO_REUSEADDR only: httplib's default also sets SO_REUSEPORT, which would
    // let a second process bind a port that is taken.
    e->server_.set_socket_options([](socket_t sock) {
      int yes = 1;
      setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    });
    e->server_.Get("/metrics", [c = e->collectable_](const httplib::Request&,
                                                     httplib::Response& res) {
      res.set_content(prometheus::TextSerializer().Serialize(c->Collect()),
                      "text/plain; version=0.0.4; charset=utf-8");
    });
    int bound = 0;
    if (port == 0) {
      bound = e->server_.bind_to_any_port(host);
    } else if (e->server_.bind_to_port(host, port)) {
      bound = port;
    }
    if (bound <= 0) {
      const bool v6 = host.find(':') != std::string::npos && host.front() != '[';
      return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", v6 ? "[" : "",
                                                 host, v6 ? "]" : "", ":", port));
    }
    e->port_ = bound;
    e->thread_ = std::thread([server = &e->server_] { server->listen_after_bind(); });
    return e;
  }
  ~MetricsEndpoint() {
    // stop() is a no-op until the listening loop runs: let it start first.
    for (int i = 0; i < 2000 && !server_.is_running(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }

  // The bound port.
  int port() const { return port_; }

 private:
  MetricsEndpoint() = default;
  std::shared_ptr<prometheus::Collectable> collectable_;
  httplib::Server server_;
  std::thread thread_;
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
