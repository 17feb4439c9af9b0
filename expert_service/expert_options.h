// dmoe-expert's flags: their declarations (help texts, defaults), the flags ->
// options parsing with every check, and the start-up and scale-in pieces of
// the binary, so that expert_service/main.cc only wires them together.
//
// Error messages are those the binary prints after "dmoe-expert: " (exit 2
// for InvalidArgument, 1 otherwise).
#ifndef DMOE_EXPERT_SERVICE_EXPERT_OPTIONS_H_
#define DMOE_EXPERT_SERVICE_EXPERT_OPTIONS_H_

#include <signal.h>

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/args.h"
#include "core/config.h"
#include "core/kernels/backend_factory.h"
#include "expert_service/expert_server.h"
#include "placement/placement.h"

namespace dmoe::expert {

inline constexpr char kExpertProgram[] = "dmoe-expert";

// What the dmoe-expert binary runs with (one field per flag).
struct ExpertMainOptions {
  std::string model_dir;                      // --model
  std::optional<std::string> join;            // --join ROUTER; none = a fixed placement
  std::string advertise;                      // --advertise
  std::optional<int64_t> server_index;        // --server-index
  std::optional<int64_t> num_servers;         // --num-servers
  std::optional<std::string> placement_file;  // --placement
  std::string host = "127.0.0.1";
  int64_t port = 50061;
  core::ComputeType compute = core::ComputeType::kBF16;  // --dtype
  core::BackendKind backend = core::BackendKind::kCpu;   // --backend
  int64_t threads = 0;
  int64_t max_queue = 256;
  int64_t max_batch_tokens = 8192;
  std::string port_file;
  int64_t drain_s = 30;        // --drain-timeout-s
  int64_t echo_port = 0;       // --raw-echo-port
  std::string echo_port_file;  // --raw-echo-port-file
  std::string metrics_host = "127.0.0.1";
  int64_t metrics_port = 9191;
  bool metrics_port_given = false;  // --metrics-port given explicitly
  std::string metrics_port_file;
  bool per_expert_metrics = true;  // --expert-metrics per-expert
  int64_t leave_s = 0;             // --leave-timeout-s (default 60 with --join)
  bool force_leave = false;

  bool joining() const { return join.has_value(); }
  bool raw_echo() const { return echo_port > 0 || !echo_port_file.empty(); }
  // Cross-flag rules and ranges; InvalidArgument with the binary's message.
  absl::Status Validate() const;
};

// Args::ForProgram("dmoe-expert", ...) with every flag declared.
common::Args ExpertArgs();
void DeclareExpertFlags(common::Args& args);
absl::StatusOr<ExpertMainOptions> ExpertOptionsFromFlags(const common::Args& args);

// The placement the options name, for the model `cfg`: empty with --join,
// --placement's file (its errors: FailedPrecondition, exit 1), or contiguous
// over --num-servers. InvalidArgument for --server-index outside it.
absl::StatusOr<place::Placement> ExpertPlacement(const ExpertMainOptions& o,
                                                 const core::ModelConfig& cfg);

// ExpertServerOptions for `o` (metrics not set).
ExpertServerOptions ToServerOptions(const ExpertMainOptions& o, place::Placement placement);

// --advertise, or host:port (the hostname when host is a wildcard).
std::string AdvertiseAddress(const ExpertMainOptions& o, int bound_port);

// Scale-in after the first stop signal `*sig` (SIGTERM with --leave-timeout-s
// and slots held): marks the server leaving and waits for the placement
// controller to move its slots, at most leave_s (longer while the controller
// refuses, unless --force-leave); a further signal from `stop_signals` ends the
// wait and replaces *sig. Prints its progress on stderr.
void LeaveBeforeStop(ExpertServer& server, const ExpertMainOptions& o, const sigset_t& stop_signals,
                     int* sig);

}  // namespace dmoe::expert

#endif  // DMOE_EXPERT_SERVICE_EXPERT_OPTIONS_H_
