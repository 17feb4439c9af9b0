// dmoe-router's flags: their declarations (help texts, defaults) and the
// flags -> options parsing with every check, so that router_service/main.cc
// only wires the router together (router_startup.h). Error messages are the
// binary's, printed as they are; flag errors exit with status 2.
#ifndef DMOE_ROUTER_SERVICE_ROUTER_OPTIONS_H_
#define DMOE_ROUTER_SERVICE_ROUTER_OPTIONS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/args.h"
#include "core/kernels/cpu/linear.h"
#include "placement/placement.h"
#include "router_service/controller.h"
#include "router_service/load_window.h"
#include "router_service/scheduler.h"

namespace dmoe::router {

inline constexpr char kRouterProgram[] = "dmoe-router";

// What the dmoe-router binary runs with.
struct RouterOptions {
  std::string model;                 // --model DIR
  std::vector<std::string> experts;  // --experts; empty = experts in-process
  std::string placement;             // --placement FILE
  place::SharedDuty shared = place::SharedDuty::kExpertServers;
  std::string host = "127.0.0.1";
  int port = 50051;
  std::string port_file;
  core::ComputeType compute = core::ComputeType::kBF16;
  // The experts this process computes itself (all without --experts; the
  // shared one with --shared-expert router): --expert-weights, auto = compute.
  core::ComputeType expert_weights = core::ComputeType::kBF16;
  std::string wire = "auto";   // --wire-dtype: activations to expert servers
  bool per_assignment = true;  // --combine=invariant
  int threads = 0;
  int micro_batches = 2;
  bool controller = false;
  ControllerOptions control;
  std::string controller_router;  // follow this router's controller
  std::string advertise;          // with controller_router
  std::vector<std::pair<int64_t, float>> gate_bias;
  SchedulerOptions sched;
  int64_t expert_deadline_ms = 10000;
  int64_t grace_ms = 5000;
  std::string metrics_host = "127.0.0.1";
  int metrics_port = 9190;
  bool metrics_port_explicit = false;
  std::string metrics_port_file;
  bool per_expert_metrics = true;
  LoadWindowOptions window;

  // The cross-flag rules: --placement needs --experts; --controller-router
  // excludes --controller, --experts and --placement and must be HOST:PORT;
  // --controller needs --experts; --host and --metrics-host not empty.
  // InvalidArgument with the binary's message.
  absl::Status Validate() const;
};

// Args::ForProgram("dmoe-router", ...) with every flag declared.
common::Args RouterArgs();
void DeclareRouterFlags(common::Args& args);
absl::StatusOr<RouterOptions> RouterOptionsFromFlags(const common::Args& args);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_ROUTER_OPTIONS_H_
