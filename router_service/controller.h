// The placement controller (docs/placement.md, "The controller switch protocol"): one per
// deployment, inside the router that runs with --controller. It plans from
// the router's load window (placement/planner.h, one MoE layer at a time) and
// re-places experts live:
//
//   1. every reachable expert server LoadSlots(V', the slots it gains), in
//      parallel: it loads them in the background and then serves both the old
//      version V and V' (a server that gains nothing just starts serving V');
//   2. the router switches to V' between two steps (RemoteExpertControl);
//      Routers that follow this one (RegisterRouter) are switched first
//      (SetPlacement); a follower that cannot be reached and has not
//      registered for `peer_timeout` is dropped; any other failure stops the
//      re-placement before step 3 (servers keep serving both versions);
//   3. every server UnloadSlots(V', the slots it no longer needs): queued
//      requests are answered first, then the weights go.
// No step is paused, and a request in flight completes under the version it
// was planned with. If step 1 fails nothing changes for the router; the next
// attempt reuses V' (a server keeps V while V' only grows), so no server ever
// drops the version the router uses.
//
// Triggers:
//   - imbalance: the worst MoE layer's max/mean load over servers (from the
//     window: Σ over a server's slots of expert load / replicas) above
//     `trigger` for `sustain` (armed above `trigger`, disarmed below
//     `trigger - hysteresis`), at least `min_interval` after the last
//     re-placement, with at least `min_tokens` tokens per layer in the window;
//     the plan is applied only if it lowers that worst max/mean by at least
//     `min_gain`;
//   - an operator: Rebalance (dmoe ctl rebalance), dry run or not;
//   - scale-out: AddServer (a server started with no routed slots joins);
//   - scale-in: RemoveServer, a server whose status says it is leaving
//     (SIGTERM), or one unreachable for `lost_after`: its slots go to the
//     others first, then it holds none. A leave the others cannot absorb
//     (active servers - 1) x slots_per_server < experts) is refused: the
//     controller logs why once, counts it (on_leave_refused), tells the
//     server in its status polls (ServerStatusRequest.leave_refused; the
//     server keeps serving) and retries on every poll, so the leave goes
//     through once a server joins.
// Servers keep their index for life (StatefulSet names are stable); a server
// that left holds no slots and is not planned for until added again.
//
// Weight memory: every server holds `slots_per_server` routed experts per
// layer; during a switch a server briefly holds its old and new slots.
//
// Thread safety: every public method is thread-safe; operations (planning and
// applying) run one at a time.
#ifndef DMOE_ROUTER_SERVICE_CONTROLLER_H_
#define DMOE_ROUTER_SERVICE_CONTROLLER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "placement/placement.h"
#include "router_service/load_window.h"
#include "router_service/remote_expert_backend.h"

namespace dmoe::router {

struct ControllerOptions {
  // Routed experts per server and layer; 0 = DefaultSlotsPerServer: enough
  // for one server to leave (N-1 servers hold every expert).
  int slots_per_server = 0;
  bool auto_rebalance = true;  // the imbalance trigger
  double trigger = 1.25;       // worst layer's server max/mean
  double hysteresis = 0.05;
  absl::Duration sustain = absl::Seconds(10);
  absl::Duration min_interval = absl::Seconds(60);
  double min_gain = 0.05;
  double min_tokens = 256;
  absl::Duration check_interval = absl::Seconds(1);  // triggers and server status polls
  absl::Duration lost_after = absl::Seconds(30);
  // Planner: hierarchical mode when both > 0; slack trades balance for moves.
  int num_groups = 0;
  int num_nodes = 0;
  double balance_slack = 0.02;
  absl::Duration load_deadline = absl::Seconds(300);  // LoadSlots (reads weights)
  absl::Duration rpc_deadline = absl::Seconds(30);    // other control RPCs
  absl::Duration switch_timeout = absl::Seconds(60);
  absl::Duration peer_timeout = absl::Seconds(10);  // followers re-register every 2 s
};

// The default routed slots per server and layer for `num_servers` servers
// and `num_experts` routed experts per layer: the fewest with which
// num_servers - 1 servers still hold every expert (ceil(E / (N-1))), so that
// one server can always leave (scale-in, eviction, a rolling update) without
// an expert losing its last server; the slots beyond E / N hold replicas of
// hot experts meanwhile. At least `initial_max` (what the starting placement
// gives a server) and at most E (one server: every expert).
int DefaultSlotsPerServer(int64_t num_experts, int num_servers, int initial_max);

// Why `server` may not leave, "" when it may: the other active servers
// (`active`, index = server) x `slots` cannot hold the routed experts of a
// layer, so experts would have no server. Names a few of the experts only
// `server` holds in `placement` and the way out.
std::string LeaveRefusal(const core::ModelConfig& cfg, const place::Placement& placement,
                         const std::vector<bool>& active, int server, int slots);

class PlacementController {
 public:
  // `window` and `experts` must outlive the controller. InvalidArgument for
  // bad options (named) or a slots_per_server that cannot hold the layer.
  static absl::StatusOr<std::unique_ptr<PlacementController>> Create(const core::ModelConfig& cfg,
                                                                     LoadWindow* window,
                                                                     RemoteExpertControl* experts,
                                                                     ControllerOptions options);
  ~PlacementController();

  // Starts / stops the trigger thread (Stop is idempotent; also in the destructor).
  void Start();
  void Stop();

  // Called after each applied re-placement (metrics), on the thread that
  // applied it.
  void set_on_replacement(std::function<void(const v1::RebalanceResponse&)> f);
  // Called once per refused leave (metrics), on the controller's thread.
  void set_on_leave_refused(std::function<void(const std::string& address)> f);

  absl::StatusOr<v1::RebalanceResponse> Rebalance(bool dry_run, const std::string& trigger);
  absl::StatusOr<v1::RebalanceResponse> AddServer(const std::string& address);
  absl::StatusOr<v1::RebalanceResponse> RemoveServer(const std::string& address,
                                                     const std::string& trigger);
  v1::PlacementResponse GetPlacement() const;
  // A follower router announces itself; returns the current placement.
  v1::PlacementResponse RegisterRouter(const std::string& address);
  v1::ExpertLoadResponse GetExpertLoad() const;
  int slots_per_server() const { return slots_per_server_; }

 private:
  struct ServerState {
    std::string address;
    bool active = true;    // planned for (holds slots)
    bool leaving = false;  // said so in its status
    absl::Time last_seen = absl::InfinitePast();
    absl::Time first_failure = absl::InfiniteFuture();
    std::string leave_refused;  // why its current leave is refused ("" = not)
    std::string remove_error;   // the last failure to move its slots (logged once)
  };
  struct Plan {
    place::Placement placement;
    std::vector<std::string> servers;
    v1::RebalanceResponse report;
  };

  PlacementController(const core::ModelConfig& cfg, LoadWindow* window,
                      RemoteExpertControl* experts, ControllerOptions options, int slots);
  void Loop();
  void PollServers();
  void CheckImbalance(absl::Time now);
  // True when the leave of `address` cannot be absorbed (LeaveRefusal): the
  // first time per leave it logs, records the reason for the server's next
  // status poll and calls on_leave_refused.
  bool RefuseLeave(const std::string& address);
  // A server that misses slots of the current placement (restarted at its
  // address) gets them loaded again: a re-placement against what each server
  // holds ("server-restarted"). ReloadLocked with op_mu_ held.
  absl::StatusOr<v1::RebalanceResponse> ReloadServer(const std::string& address);
  absl::StatusOr<v1::RebalanceResponse> ReloadLocked(std::vector<ServerState> servers,
                                                     const std::string& address)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);
  // Plans over the active servers (`servers` lists every index's address).
  absl::StatusOr<Plan> MakePlan(const std::vector<ServerState>& servers, const std::string& trigger)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);
  absl::Status Apply(Plan& plan) ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);
  absl::StatusOr<v1::RebalanceResponse> PlanAndApply(std::vector<ServerState> servers,
                                                     const std::string& trigger, bool dry_run)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(op_mu_);
  v1::ExpertService::Stub* Stub(const std::string& address);
  std::vector<ServerState> Servers() const;

  const core::ModelConfig cfg_;
  LoadWindow* const window_;
  RemoteExpertControl* const experts_;
  const ControllerOptions options_;
  const int slots_per_server_;
  const int64_t expert_bytes_;  // one routed expert, bf16

  absl::Mutex op_mu_;  // one operation at a time
  uint64_t next_version_ ABSL_GUARDED_BY(op_mu_) = 0;

  mutable absl::Mutex mu_;
  std::vector<ServerState> servers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<v1::ExpertService::Stub>> stubs_ ABSL_GUARDED_BY(mu_);
  absl::Time last_replacement_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Time armed_since_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  std::function<void(const v1::RebalanceResponse&)> on_replacement_ ABSL_GUARDED_BY(mu_);
  std::function<void(const std::string&)> on_leave_refused_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, absl::Time> peers_ ABSL_GUARDED_BY(mu_);  // follower -> last seen
  std::map<std::string, std::unique_ptr<v1::RouterService::Stub>> peer_stubs_ ABSL_GUARDED_BY(mu_);

  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_CONTROLLER_H_
