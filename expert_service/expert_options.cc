#include "expert_service/expert_options.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <ctime>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/metrics_endpoint.h"
#include "common/service_main.h"
#include "core/expert_backend.h"
#include "core/status.h"

namespace dmoe::expert {
namespace {

constexpr const char* kName = kExpertProgram;

absl::Status Bad(const std::string& message) { return absl::InvalidArgumentError(message); }

}  // namespace

void DeclareExpertFlags(common::Args& a) {
  a.Flag("model", "DIR", "model directory (config.json + *.safetensors)", std::nullopt, true)
      .Flag("server-index", "I", "this server's index in the placement (required without --join)")
      .Flag("num-servers", "N", "contiguous placement over N servers (version 1)")
      .Flag("placement", "FILE", "placement JSON (instead of --num-servers)")
      .Flag("host", "HOST", "address to listen on", "127.0.0.1")
      .Flag("port", "P", "port to listen on; 0 = any free port", "50061")
      .Flag("dtype", "f32|bf16", "expert compute type", "bf16")
      .Flag("expert-weights", "auto|f32|bf16|int8",
            "format the experts' weights are held in (auto = --dtype; int8 = per-channel "
            "symmetric, quantised at load, half of bf16's bytes, CPU backend only)",
            "auto")
      .Flag("threads", "N", "compute threads; 0 = all cores", "0")
      .Flag("backend", "cpu|cuda|auto",
            "expert compute backend: cpu; cuda (every visible GPU; exit 1 "
            "without one or in a build without CUDA); auto = cuda when this "
            "build has CUDA and a GPU is visible, else cpu",
            "cpu")
      .Flag("max-queue", "N", "requests waiting for compute before RESOURCE_EXHAUSTED", "256")
      .Flag("max-batch-tokens", "N", "tokens per batched expert computation", "8192")
      .Flag("port-file", "PATH", "write the bound port here once listening")
      .Flag("drain-timeout-s", "S", "on SIGTERM, cancel streams still busy after S seconds", "30")
      .Flag("raw-echo-port", "P",
            "benchmarking aid: raw TCP echo of framed messages on "
            "127.0.0.1:P, the floor wire_bench compares gRPC with "
            "(expert_service/raw_echo.h); 0 = off unless --raw-echo-port-file",
            "0")
      .Flag("raw-echo-port-file", "PATH",
            "start the raw TCP echo (any free port when --raw-echo-port is 0) "
            "and write its port here")
      .Flag("metrics-host", "HOST",
            "address of the Prometheus /metrics endpoint (0.0.0.0 in a pod)", "127.0.0.1")
      .Flag("metrics-port", "P",
            "port of /metrics (0 = any free port); when the default is taken "
            "(several servers on one host) the server runs without /metrics "
            "and says so",
            "9191")
      .Flag("metrics-port-file", "PATH", "write the bound metrics port here once listening")
      .Flag("expert-metrics", "per-expert|per-layer",
            "slot-token series per (layer, expert), or per layer "
            "(expert=\"all\") to bound cardinality",
            "per-expert")
      .Flag("join", "ROUTER",
            "scale-out: start with no routed slots and ask the placement "
            "controller of ROUTER (HOST:PORT, a dmoe-router --controller) "
            "for slots (instead of --num-servers / --placement)")
      .Flag("advertise", "HOST:PORT",
            "the address routers reach this server at (default: --host, or "
            "the hostname when --host is a wildcard, and the bound port)")
      .Flag("leave-timeout-s", "S",
            "scale-in: on SIGTERM, first report 'leaving' and keep serving "
            "until the placement controller has moved this server's slots "
            "away, at most S seconds (0 = drain at once; default 60 with "
            "--join, else 0). SIGINT (whole-cluster stop, Ctrl-C) or a "
            "second signal skips the leave. When the controller refuses the "
            "leave (the other servers cannot hold this server's experts: "
            "leaving would leave an expert with no server), the server keeps "
            "serving past S until its slots can move (e.g. a server joins), "
            "unless --force-leave")
      .Flag("force-leave", "",
            "scale-in: exit at --leave-timeout-s even when the controller "
            "refused the leave (experts only this server holds then have no "
            "server: their requests fail until one joins)");
}

common::Args ExpertArgs() {
  common::Args a = common::Args::ForProgram(
      kName,
      "serves the routed experts its placement gives it, plus the shared "
      "experts,\n"
      "  as dmoe.v1.ExpertService (with gRPC health and reflection). SIGTERM "
      "or\n"
      "  SIGINT: stop taking streams, answer what was received, exit 0\n"
      "  (SIGTERM leaves first with --leave-timeout-s; SIGINT does not).");
  DeclareExpertFlags(a);
  return a;
}

absl::Status ExpertMainOptions::Validate() const {
  const bool join = joining();
  const bool has_num_servers = num_servers.has_value(), has_placement = placement_file.has_value();
  if (join && (has_num_servers || has_placement)) {
    return Bad("--join starts with no slots: give no --num-servers or --placement");
  }
  if (!join && has_num_servers == has_placement) {
    return Bad("give exactly one of --num-servers and --placement (see --help)");
  }
  if (!join && !server_index) return Bad("--server-index is required (unless --join)");
  if (leave_s < 0) return Bad(absl::StrCat("--leave-timeout-s must be >= 0, got ", leave_s));
  if (has_num_servers && *num_servers < 1) {
    return Bad(absl::StrCat("--num-servers must be >= 1, got ", *num_servers));
  }
  if (server_index.value_or(0) < 0) {
    return Bad(absl::StrCat("--server-index must be >= 0, got ", *server_index));
  }
  if (port < 0 || port > 65535) {
    return Bad(absl::StrCat("--port must be in [0, 65535], got ", port));
  }
  if (metrics_port < 0 || metrics_port > 65535) {
    return Bad(absl::StrCat("--metrics-port must be in [0, 65535], got ", metrics_port));
  }
  if (metrics_host.empty()) return Bad("--metrics-host is empty");
  if (echo_port < 0 || echo_port > 65535) {
    return Bad(absl::StrCat("--raw-echo-port must be in [0, 65535], got ", echo_port));
  }
  if (threads < 0) return Bad(absl::StrCat("--threads must be >= 0, got ", threads));
  if (max_queue < 1) return Bad(absl::StrCat("--max-queue must be >= 1, got ", max_queue));
  if (max_batch_tokens < 1) {
    return Bad(absl::StrCat("--max-batch-tokens must be >= 1, got ", max_batch_tokens));
  }
  if (drain_s < 0) return Bad(absl::StrCat("--drain-timeout-s must be >= 0, got ", drain_s));
  return absl::OkStatus();
}

absl::StatusOr<ExpertMainOptions> ExpertOptionsFromFlags(const common::Args& args) {
  ExpertMainOptions o;
  o.model_dir = args.Str("model");
  if (args.Has("join")) o.join = args.Str("join");
  const bool join = args.Has("join");
  // The cross-flag rules first, on presence (a flag may be given empty).
  if (join && (args.Has("num-servers") || args.Has("placement"))) {
    return Bad("--join starts with no slots: give no --num-servers or --placement");
  }
  if (!join && args.Has("num-servers") == args.Has("placement")) {
    return Bad("give exactly one of --num-servers and --placement (see --help)");
  }
  if (!join && !args.Has("server-index")) {
    return Bad("--server-index is required (unless --join)");
  }
  o.force_leave = args.Bool("force-leave");
  o.leave_s = join ? 60 : 0;
  if (args.Has("leave-timeout-s")) {
    DMOE_ASSIGN_OR_RETURN(o.leave_s, args.Int("leave-timeout-s"));
    if (o.leave_s < 0) return Bad(absl::StrCat("--leave-timeout-s must be >= 0, got ", o.leave_s));
  }
  if (args.Has("server-index")) {
    DMOE_ASSIGN_OR_RETURN(o.server_index, args.Int("server-index"));
  }
  for (auto [name, out] : {std::pair{"port", &o.port},
                           {"metrics-port", &o.metrics_port},
                           {"raw-echo-port", &o.echo_port},
                           {"threads", &o.threads},
                           {"max-queue", &o.max_queue},
                           {"max-batch-tokens", &o.max_batch_tokens},
                           {"drain-timeout-s", &o.drain_s}}) {
    DMOE_ASSIGN_OR_RETURN(*out, args.Int(name));
  }
  if (args.Has("num-servers")) {
    DMOE_ASSIGN_OR_RETURN(o.num_servers, args.Int("num-servers"));
    if (*o.num_servers < 1) {
      return Bad(absl::StrCat("--num-servers must be >= 1, got ", *o.num_servers));
    }
  }
  if (args.Has("placement")) o.placement_file = args.Str("placement");
  o.host = args.Str("host");
  o.port_file = args.Str("port-file");
  o.echo_port_file = args.Str("raw-echo-port-file");
  o.metrics_host = args.Str("metrics-host");
  o.metrics_port_given = args.Has("metrics-port");
  o.metrics_port_file = args.Str("metrics-port-file");
  o.advertise = args.Str("advertise");
  // Ranges, in the order the binary always checked them.
  DMOE_RETURN_IF_ERROR(o.Validate());
  DMOE_ASSIGN_OR_RETURN(o.per_expert_metrics,
                        common::ParseExpertMetricsFlag(args.Str("expert-metrics")));
  const std::string dtype = args.Str("dtype");
  if (dtype == "f32") {
    o.compute = core::ComputeType::kF32;
  } else if (dtype == "bf16") {
    o.compute = core::ComputeType::kBF16;
  } else {
    return Bad(absl::StrCat("--dtype must be f32 or bf16, got '", dtype, "'"));
  }
  absl::StatusOr<core::ComputeType> weights =
      core::ParseExpertWeights(args.Str("expert-weights"), o.compute);
  if (!weights.ok()) return Bad(absl::StrCat("--", weights.status().message()));
  o.compute = *weights;
  absl::StatusOr<core::BackendKind> backend = core::ParseBackendKind(args.Str("backend"));
  if (!backend.ok()) return Bad(absl::StrCat("--", backend.status().message()));
  o.backend = *backend;
  return o;
}

absl::StatusOr<place::Placement> ExpertPlacement(const ExpertMainOptions& o,
                                                 const core::ModelConfig& cfg) {
  if (o.joining()) return place::Placement();
  place::Placement placement;
  if (o.placement_file) {
    auto p = place::Placement::FromFile(*o.placement_file, cfg);
    if (!p.ok()) return absl::FailedPreconditionError(p.status().message());
    placement = *std::move(p);
  } else {
    auto p = place::Placement::Contiguous(cfg, static_cast<int>(o.num_servers.value_or(0)));
    if (!p.ok()) return Bad(std::string(p.status().message()));
    placement = *std::move(p);
  }
  if (*o.server_index >= placement.num_servers()) {
    return Bad(absl::StrCat("--server-index ", *o.server_index, " is outside the placement's ",
                            placement.num_servers(), " servers"));
  }
  return placement;
}

ExpertServerOptions ToServerOptions(const ExpertMainOptions& o, place::Placement placement) {
  ExpertServerOptions options;
  options.start_empty = o.joining();
  options.placement = std::move(placement);
  options.model_dir = o.model_dir;
  options.server_index = static_cast<int>(o.server_index.value_or(0));
  options.compute = o.compute;
  options.backend = o.backend;
  options.threads = static_cast<int>(o.threads);
  options.max_queue = static_cast<size_t>(o.max_queue);
  options.max_batch_tokens = o.max_batch_tokens;
  return options;
}

std::string AdvertiseAddress(const ExpertMainOptions& o, int bound_port) {
  return common::AdvertiseAddress(o.advertise, o.host, bound_port);
}

void LeaveBeforeStop(ExpertServer& server, const ExpertMainOptions& o, const sigset_t& stop_signals,
                     int* sig) {
  // SIGTERM is scale-in (what Kubernetes and `kill` send to one server): leave
  // first. SIGINT is a stop without leaving, for a whole-cluster stop (`dmoe
  // up` sends it once the router is gone) or a Ctrl-C: nobody is left to take
  // the slots, so waiting for a controller would only delay the exit.
  if (*sig != SIGTERM || o.leave_s <= 0 || server.num_slots() == 0) return;
  std::fprintf(stderr,
               "%s: %s, leaving: waiting up to %lld s for the placement controller "
               "to move %lld slots (SIGINT or a second SIGTERM: stop waiting)\n",
               kName, strsignal(*sig), static_cast<long long>(o.leave_s),
               static_cast<long long>(server.num_slots()));
  std::fflush(stderr);
  // Leave(0) marks the server leaving and tells whether it is empty; the
  // wait in between takes a further stop signal, which ends the leave.
  // A refused leave (the controller says the others cannot hold this
  // server's experts) outlasts the timeout: exiting would leave those
  // experts with no server, i.e. fail every request (issue 13.3). The server
  // stays until its slots move (the controller retries the leave on every
  // poll), the leave is forced (--force-leave, a second signal), or the
  // orchestrator kills it (Kubernetes: terminationGracePeriodSeconds).
  const absl::Time deadline = absl::Now() + absl::Seconds(o.leave_s);
  const char* outcome = "leave timeout: still holding slots";
  bool told_refused = false;
  while (true) {
    if (server.Leave(absl::ZeroDuration())) {
      outcome = "slots moved away";
      break;
    }
    const std::string refused = server.leave_refused();
    if (!refused.empty() && !told_refused) {
      told_refused = true;
      std::fprintf(stderr,
                   "%s: leave refused by the placement controller: %s; %s "
                   "(SIGINT or a second SIGTERM forces the exit)\n",
                   kName, refused.c_str(),
                   o.force_leave ? "--force-leave: exiting at the leave timeout anyway"
                                 : "staying and serving until the slots can move");
      std::fflush(stderr);
    }
    if (absl::Now() >= deadline && (refused.empty() || o.force_leave)) {
      if (!refused.empty()) outcome = "leave timeout (--force-leave): still holding slots";
      break;
    }
    const timespec poll = {0, 50 * 1000 * 1000};
    if (const int again = sigtimedwait(&stop_signals, nullptr, &poll); again > 0) {
      *sig = again;
      outcome = "leave interrupted: still holding slots";
      break;
    }
  }
  std::fprintf(stderr, "%s: %s\n", kName, outcome);
}

}  // namespace dmoe::expert
