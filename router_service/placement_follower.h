// A router that follows another router's placement controller
// (dmoe-router --controller-router): fetching the placement at start
// (FetchPlacement), re-registering with the controller's router every couple
// of seconds and applying any newer placement it answers with
// (PlacementFollower), and switching this router's expert backend to a
// placement (ApplyPlacement; also what a controller's SetPlacement push runs).
#ifndef DMOE_ROUTER_SERVICE_PLACEMENT_FOLLOWER_H_
#define DMOE_ROUTER_SERVICE_PLACEMENT_FOLLOWER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "dmoe/v1/router.pb.h"
#include "router_service/remote_expert_backend.h"
#include "router_service/router_metrics.h"

namespace dmoe::router {

// GetPlacement from the router at `router` (HOST:PORT), retried while that
// router is not up yet (UNAVAILABLE, DEADLINE_EXCEEDED): `attempts` tries,
// `retry_interval` apart, each with a 5 s deadline. Unavailable
// "--controller-router ROUTER: no placement: <gRPC error>" when it gives up
// or on any other error.
absl::StatusOr<v1::PlacementResponse> FetchPlacement(
    const std::string& router, int attempts = 120,
    absl::Duration retry_interval = absl::Seconds(1));

// Switches `control` to the placement `json` (version `version`) over
// `servers`, unless it already has that version or a newer one (then OK,
// nothing done). InvalidArgument when the JSON does not parse for `cfg` or
// names another version. Tells `metrics` (may be null) the new servers and
// placement, and says so on stderr.
absl::Status ApplyPlacement(const core::ModelConfig& cfg, RemoteExpertControl& control,
                            RouterMetrics* metrics, uint64_t version, const std::string& json,
                            std::vector<std::string> servers);

struct PlacementFollowerOptions {
  std::string controller_router;               // HOST:PORT of the router running --controller
  std::string advertise;                       // HOST:PORT the controller reaches this router at
  absl::Duration interval = absl::Seconds(2);  // between registrations
  absl::Duration deadline = absl::Seconds(5);  // of one RegisterRouter call
};

// Registers this router with the controller's router every `interval`
// (RegisterRouter with the advertised address and the placement version
// `current_version()` says this router has) and calls `apply` with every
// answer whose version is newer. A failed apply is printed on stderr and
// retried with the next registration. One thread, from Start to Stop.
class PlacementFollower {
 public:
  using Apply = std::function<absl::Status(const v1::PlacementResponse&)>;
  PlacementFollower(PlacementFollowerOptions options, std::function<uint64_t()> current_version,
                    Apply apply);
  ~PlacementFollower();  // Stop()
  PlacementFollower(const PlacementFollower&) = delete;
  PlacementFollower& operator=(const PlacementFollower&) = delete;

  void Start();
  // Ends the thread: at once between registrations, else after the call in
  // flight (at most `deadline`). Idempotent.
  void Stop();

  // Successful RegisterRouter calls so far.
  int64_t registrations() const { return registrations_.load(); }

 private:
  void Run();

  const PlacementFollowerOptions options_;
  const std::function<uint64_t()> current_version_;
  const Apply apply_;
  std::atomic<int64_t> registrations_{0};
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_PLACEMENT_FOLLOWER_H_
