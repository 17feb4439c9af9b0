// dmoe-gateway: the public API. OpenAI-compatible HTTP (completions, chat
// completions with SSE streaming, models, health, metrics) and an optional gRPC
// RouterService pass-through, picking the least-loaded router per request.
//
// Exit codes: 0 after a graceful shutdown (SIGTERM/SIGINT) or --help, 1 when a
// port cannot be bound or the port file cannot be written, 2 for bad flags.
#include <signal.h>

#include <cstdio>
#include <optional>
#include <string>
#include <utility>

#include "common/args.h"
#include "common/service_main.h"
#include "gateway/gateway.h"
#include "gateway/gateway_options.h"

namespace dmoe::gateway {
namespace {

constexpr const char* kName = kGatewayProgram;

int Main(int argc, char** argv) {
  // Shutdown signals are taken with sigwait on this thread; every other thread
  // inherits the mask. A client that goes away must not kill the process.
  sigset_t signals = common::BlockStopSignals();
  // No tcmalloc thread-cache cap here (unlike the router and expert servers):
  // in the 30-minute soaks the gateway stayed flat without it (+1.7%) and grew
  // +30% with it (285 threads sharing 8 MiB of thread caches).
  signal(SIGPIPE, SIG_IGN);

  common::Args args = GatewayArgs();
  if (std::optional<int> exit = common::ParseFlagsOrExit(args, argc, argv)) return *exit;
  absl::StatusOr<GatewayMainOptions> cfg = GatewayOptionsFromFlags(args);
  if (!cfg.ok()) {
    std::fprintf(stderr, "%s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  absl::StatusOr<std::unique_ptr<Gateway>> gw = Gateway::Start(cfg->gateway);
  if (!gw.ok()) {
    std::fprintf(stderr, "%s: %s\n", kName, std::string(gw.status().message()).c_str());
    return gw.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  for (const auto& [path, port] : {std::pair{cfg->port_file, (*gw)->http_port()},
                                   std::pair{cfg->grpc_port_file, (*gw)->grpc_port()}}) {
    if (path.empty()) continue;
    if (absl::Status st = common::WritePortFile(path, port); !st.ok()) {
      std::fprintf(stderr, "%s: %s\n", kName, std::string(st.message()).c_str());
      return 1;
    }
  }
  std::fprintf(stderr, "%s: HTTP on %s:%d", kName, cfg->gateway.host.c_str(), (*gw)->http_port());
  if ((*gw)->grpc_port() > 0) std::fprintf(stderr, ", gRPC on port %d", (*gw)->grpc_port());
  std::fprintf(stderr, "; %d of %zu routers healthy\n", (*gw)->routers().HealthyCount(),
               cfg->gateway.routers.size());

  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "%s: %s, shutting down (grace %lld ms)\n", kName,
               sig == SIGTERM ? "SIGTERM" : "SIGINT", static_cast<long long>(cfg->grace_ms));
  (*gw)->Shutdown(absl::Milliseconds(cfg->grace_ms));
  gw->reset();
  std::fprintf(stderr, "%s: stopped\n", kName);
  return 0;
}

}  // namespace
}  // namespace dmoe::gateway

int main(int argc, char** argv) { return dmoe::gateway::Main(argc, argv); }
