// dmoe-router: attention, KV cache, gates and continuous batching, with the
// routed experts on dmoe-expert servers (--experts) or in-process.
//
// Exit codes: 0 after a graceful shutdown (SIGTERM/SIGINT) or --help, 1 when
// the model or the placement cannot be loaded or the port (or an explicit
// --metrics-port) cannot be bound, 2 for bad flags.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "common/args.h"
#include "common/metrics_endpoint.h"
#include "common/service_main.h"
#include "core/isa.h"
#include "prometheus/registry.h"
#include "router_service/router_options.h"
#include "router_service/router_startup.h"
#include "router_service/scheduler.h"

namespace dmoe::router {
namespace {

constexpr const char* kName = kRouterProgram;

int Fail(const absl::Status& st, int code) {
  std::fprintf(stderr, "%s: %s\n", kName, std::string(st.message()).c_str());
  return code;
}

int Main(int argc, char** argv) {
  // Block the shutdown signals in every thread (threads inherit the mask) and
  // take them with sigwait on the main thread.
  sigset_t signals = common::BlockStopSignals();
  common::CapMallocThreadCaches();
  if (absl::Status st = core::CheckAndLogIsa(kName); !st.ok()) return Fail(st, 2);
  common::Args args = RouterArgs();
  if (std::optional<int> exit = common::ParseFlagsOrExit(args, argc, argv)) return *exit;
  absl::StatusOr<RouterOptions> cfg = RouterOptionsFromFlags(args);
  if (!cfg.ok()) {
    std::fprintf(stderr, "%s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  core::SetComputeThreads(cfg->threads);

  absl::StatusOr<core::ModelConfig> model_cfg = ReadModelConfig(*cfg);
  if (!model_cfg.ok()) return Fail(model_cfg.status(), 1);
  absl::StatusOr<place::Placement> placement = StartPlacement(&*cfg, *model_cfg);
  if (!placement.ok()) return Fail(placement.status(), 1);
  // The router's one load window: RouterMetrics writes it (routing and
  // per-server tokens) and exports its balance; the placement controller
  // reads the same one.
  LoadWindow window(model_cfg->num_hidden_layers, model_cfg->n_routed_experts,
                    std::max(1, placement->num_servers()), cfg->window);
  auto registry = std::make_shared<prometheus::Registry>();
  RouterMetrics metrics(*registry, *model_cfg, *placement, &window,
                        {cfg->per_expert_metrics, cfg->experts});

  RemoteExpertControl* control = nullptr;
  absl::StatusOr<std::unique_ptr<core::Model>> model =
      LoadModel(*cfg, *placement, &metrics, &control);
  if (!model.ok()) return Fail(model.status(), 1);
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
      Scheduler::Create(*std::move(model), WithStepMetrics(cfg->sched, &metrics));
  if (!scheduler.ok()) return Fail(scheduler.status(), 1);
  metrics.SetLoadSource([s = scheduler->get()] { return s->GetLoad(); });
  std::unique_ptr<PlacementController> controller;
  if (cfg->controller) {
    auto made = MakeController(*cfg, *model_cfg, &window, control, &metrics);
    if (!made.ok()) return Fail(made.status(), 2);
    controller = *std::move(made);
  }
  RouterServer service(**scheduler, controller.get());
  if (!cfg->controller_router.empty()) {  // the controller's router pushes placements
    service.set_placement_setter(PlacementSetter(*model_cfg, control, &metrics));
  }
  // Readiness: see MakeReadiness. It also shows in GetLoad (the gateways' health).
  std::atomic<grpc::HealthCheckServiceInterface*> health_service{nullptr};
  std::unique_ptr<ReadinessMonitor> readiness;
  metrics.SetReady(true);
  if (control != nullptr) {
    readiness = MakeReadiness(*model_cfg, control, &metrics, &health_service);
    service.set_readiness([r = readiness.get()] { return r->Ready(); });
  }
  absl::StatusOr<StartedServer> server = StartRouterGrpcServer(&service, cfg->host, cfg->port);
  if (!server.ok()) return Fail(server.status(), 1);
  if (readiness != nullptr) {
    health_service = server->server->GetHealthCheckService();
    readiness->Start();  // one check now: known before the port file says "serving"
  }
  // Scrapes refresh the balance and scheduler gauges first. Declared after
  // everything its refresh reads, so destroyed (stopped) before them; up
  // before the port file is written, so that the file means "all serving".
  absl::StatusOr<std::unique_ptr<common::MetricsEndpoint>> metrics_endpoint = common::ServeMetrics(
      kName, cfg->metrics_host, cfg->metrics_port, cfg->metrics_port_explicit,
      cfg->metrics_port_file,
      std::make_shared<common::RefreshingCollectable>(registry, [&metrics] { metrics.Refresh(); }));
  if (!metrics_endpoint.ok()) {
    server->server->Shutdown();
    return Fail(metrics_endpoint.status(), 1);
  }
  if (!cfg->port_file.empty()) {
    if (auto st = common::WritePortFile(cfg->port_file, server->port); !st.ok()) {
      server->server->Shutdown();
      return Fail(st, 1);
    }
  }
  std::fprintf(stderr, "%s: serving on %s:%d (%zu expert servers)\n", kName, cfg->host.c_str(),
               server->port, cfg->experts.size());
  {
    const core::KvCache kv(*model_cfg, 0, 1, false, cfg->sched.kv_dtype);  // geometry only
    const int64_t block = cfg->sched.kv_block_tokens;
    const size_t blocks = cfg->sched.kv_cache_bytes / (kv.BytesPerToken() * block);
    std::fprintf(
        stderr,
        "%s: KV cache %s, %zu bytes per token: %zu blocks of %lld tokens (%zu tokens) in "
        "%zu bytes; admission %s, prefix cache %s\n",
        kName, core::KvDtypeName(cfg->sched.kv_dtype), kv.BytesPerToken(), blocks,
        static_cast<long long>(block), blocks * static_cast<size_t>(block),
        cfg->sched.kv_cache_bytes,
        cfg->sched.kv_admission == KvAdmission::kPaged ? "paged" : "reserve",
        cfg->sched.prefix_cache && cfg->sched.kv_admission == KvAdmission::kPaged ? "on" : "off");
  }
  std::unique_ptr<PlacementFollower> follower;
  if (!cfg->controller_router.empty()) {
    follower = MakePlacementFollower(*cfg, *model_cfg, control, &metrics, server->port);
    follower->Start();
  }
  if (controller != nullptr) {
    controller->Start();
    std::fprintf(stderr, "%s: placement controller on (%s, %d slots per server)\n", kName,
                 cfg->control.auto_rebalance ? "auto" : "manual", controller->slots_per_server());
  }
  if (*metrics_endpoint != nullptr) {
    std::fprintf(stderr, "%s: metrics on http://%s:%d/metrics\n", kName, cfg->metrics_host.c_str(),
                 (*metrics_endpoint)->port());
  }

  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "%s: %s, shutting down (grace %lld ms)\n", kName,
               sig == SIGTERM ? "SIGTERM" : "SIGINT", static_cast<long long>(cfg->grace_ms));
  if (auto* health = server->server->GetHealthCheckService()) health->Shutdown();
  if (readiness != nullptr) readiness->Stop();
  if (controller != nullptr) controller->Stop();
  if (follower != nullptr) follower->Stop();
  // New requests are refused from here on; in-flight ones get the grace period,
  // then end with UNAVAILABLE, which finishes their RPCs.
  (*scheduler)->Shutdown(absl::Milliseconds(cfg->grace_ms));
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  std::fprintf(stderr, "%s: stopped\n", kName);
  return 0;
}

}  // namespace
}  // namespace dmoe::router

int main(int argc, char** argv) { return dmoe::router::Main(argc, argv); }
