// An ExpertBackend whose routed experts live on expert servers (dmoe-expert),
// reached over one long-lived gRPC bidirectional Dispatch stream per server.
//
// Compute(batch) splits the batch with core::SplitByServer (each token goes once
// to every server it visits; shared duty to a server it already visits, or kept
// local with SharedDuty::kRouter), packs activations (bf16 by default, f32 in
// exact mode), sends every server its share concurrently, waits for all replies
// under a deadline, and sums the partial vectors per token in ascending server
// order (deterministic). With SharedDuty::kRouter the shared FFN is computed
// locally (overlapped with the round trips) by a CPU backend that LoadFfn(layer,
// kSharedFfn, ...) fills; LoadFfn of routed experts is refused.
//
// Errors name the server: UNAVAILABLE / DEADLINE_EXCEEDED when a server is down
// or slow, and the server's own status (e.g. FAILED_PRECONDITION for a stale
// placement version). On error `out` is not written. Streams reconnect on the
// next Compute after a failure.
//
// Thread safety: Compute may be called from one thread at a time.
#ifndef DMOE_ROUTER_SERVICE_REMOTE_EXPERT_BACKEND_H_
#define DMOE_ROUTER_SERVICE_REMOTE_EXPERT_BACKEND_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/expert_backend.h"
#include "core/placement.h"
#include "core/wire.h"

namespace dmoe::router {

struct RemoteExpertOptions {
  std::vector<std::string> servers;  // "host:port", index = server index of the placement
  core::Placement placement;
  core::WireDType wire_dtype = core::WireDType::kBF16;
  core::SharedDuty shared_duty = core::SharedDuty::kExpertServers;
  core::ComputeType local_compute = core::ComputeType::kBF16;  // local shared FFN
  std::chrono::milliseconds deadline{10000};  // per layer round trip
};

// Connects lazily (first Compute). InvalidArgument when the server count does
// not match the placement.
absl::StatusOr<std::unique_ptr<core::ExpertBackend>> MakeRemoteExpertBackend(
    RemoteExpertOptions options);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_REMOTE_EXPERT_BACKEND_H_
