// Readiness of a router: can the served model run a token now?
//
// A token visits every MoE layer and, in each, up to top-k of its routed
// experts, any of them: the model can run a token only when every routed
// expert of every MoE layer has at least one live expert server holding it in
// the router's placement. ReadinessMonitor checks that every `interval`: it
// probes every expert server of the placement (ExpertService.GetStatus with a
// deadline; live = it answered) and keeps the result.
//
// Who reads it (issue 13.3, "honest health"):
//   - RouterService.GetLoad answers UNAVAILABLE with the reason while not
//     ready, so a gateway's RouterPool counts the router unhealthy and the
//     gateway's /health turns 503 when no router is ready;
//   - the gRPC health service: "dmoe.v1.RouterService" is the readiness
//     (NOT_SERVING while not ready; Kubernetes readinessProbe), "" the
//     liveness (SERVING while the process serves; livenessProbe): a router
//     whose experts are gone must not be restarted, it recovers by itself when
//     a server returns;
//   - moe_router_ready.
// A router whose experts are in-process is always ready; none of this runs.
//
// Thread safety: every method is thread-safe. `on_change` runs on the
// monitor's thread (or Start's caller), with no lock held.
#ifndef DMOE_ROUTER_SERVICE_READINESS_H_
#define DMOE_ROUTER_SERVICE_READINESS_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "placement/placement.h"
#include "router_service/remote_expert_backend.h"

namespace dmoe::router {

// OK when every routed expert of every MoE layer of `cfg` has a server in
// `placement` whose entry in `live` (index = server) is OK; else UNAVAILABLE
// naming the first such expert, how many there are, and why its servers are
// not live, e.g. "cannot serve a token: layer 1 expert 5 has no live expert
// server (10 experts in all; server 1 (127.0.0.1:5001): connection refused)".
absl::Status CheckServable(const core::ModelConfig& cfg, const place::Placement& placement,
                           const std::vector<std::string>& servers,
                           const std::vector<absl::Status>& live);

struct ReadinessOptions {
  absl::Duration interval = absl::Seconds(1);
  absl::Duration probe_timeout = absl::Seconds(1);
};

class ReadinessMonitor {
 public:
  // Is the expert server at `address` live? (Default: GetStatus answers
  // within `timeout`.) Called from the monitor's thread, once per server and
  // round, in parallel.
  using Probe = std::function<absl::Status(const std::string& address, absl::Duration timeout)>;

  // `control` (the router's placement and server addresses) must outlive the
  // monitor. A null `probe` = the default.
  ReadinessMonitor(const core::ModelConfig& cfg, RemoteExpertControl* control, Probe probe,
                   std::function<void(const absl::Status&)> on_change, ReadinessOptions options);
  ~ReadinessMonitor();

  // Runs one check (so Ready() is known on return), then checks every
  // `interval` on a thread until Stop (idempotent; also the destructor).
  void Start();
  void Stop();
  // The last check's result (OK before the first).
  absl::Status Ready() const;
  // One check now; returns (and keeps) its result.
  absl::Status CheckNow();

 private:
  absl::Status DefaultProbe(const std::string& address, absl::Duration timeout);

  const core::ModelConfig cfg_;
  RemoteExpertControl* const control_;
  const Probe probe_;
  const std::function<void(const absl::Status&)> on_change_;
  const ReadinessOptions options_;

  absl::Mutex check_mu_;  // one check at a time; orders on_change calls
  mutable absl::Mutex mu_;
  absl::Status ready_ ABSL_GUARDED_BY(mu_);
  bool checked_ ABSL_GUARDED_BY(mu_) = false;
  struct Channel;
  std::map<std::string, std::shared_ptr<Channel>> channels_ ABSL_GUARDED_BY(mu_);

  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_READINESS_H_
