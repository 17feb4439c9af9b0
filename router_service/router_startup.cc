#include "router_service/router_startup.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/service_main.h"
#include "core/expert_backend.h"
#include "core/status.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "router_service/placement_follower.h"

namespace dmoe::router {
namespace {

constexpr const char* kName = kRouterProgram;

}  // namespace

absl::StatusOr<core::ModelConfig> ReadModelConfig(const RouterOptions& o) {
  std::error_code ec;
  if (!std::filesystem::is_directory(o.model, ec)) {
    return absl::NotFoundError(absl::StrCat("--model: '", o.model, "' is not a directory"));
  }
  return core::ModelConfig::FromFile(o.model + "/config.json");
}

absl::StatusOr<place::Placement> StartPlacement(RouterOptions* o, const core::ModelConfig& cfg) {
  if (!o->controller_router.empty()) {
    DMOE_ASSIGN_OR_RETURN(v1::PlacementResponse fetched, FetchPlacement(o->controller_router));
    nlohmann::json j = nlohmann::json::parse(fetched.placement_json(), nullptr, false);
    absl::StatusOr<place::Placement> placement = place::Placement::FromJson(j, cfg);
    o->experts.assign(fetched.server_addresses().begin(), fetched.server_addresses().end());
    std::fprintf(stderr, "%s: following %s: placement version %llu over %zu expert servers\n",
                 kName, o->controller_router.c_str(),
                 static_cast<unsigned long long>(fetched.version()), o->experts.size());
    return placement;
  }
  if (!o->placement.empty()) return place::Placement::FromFile(o->placement, cfg);
  if (o->experts.empty() && cfg.n_routed_experts == 0) return place::Placement();
  return place::Placement::Contiguous(cfg, std::max(1, static_cast<int>(o->experts.size())));
}

common::WireDType WireDType(const RouterOptions& o) {
  if (o.wire == "f32") return common::WireDType::kF32;
  if (o.wire == "bf16") return common::WireDType::kBF16;
  if (o.wire == "fp8") return common::WireDType::kF8E4M3;
  return o.compute == core::ComputeType::kF32 ? common::WireDType::kF32 : common::WireDType::kBF16;
}

absl::StatusOr<std::unique_ptr<core::Model>> LoadModel(const RouterOptions& o,
                                                       const place::Placement& placement,
                                                       RouterMetrics* metrics,
                                                       RemoteExpertControl** control) {
  core::ModelOptions opts;
  opts.compute = o.compute;
  if (!o.gate_bias.empty()) {
    DMOE_ASSIGN_OR_RETURN(core::ModelConfig cfg,
                          core::ModelConfig::FromFile(o.model + "/config.json"));
    opts.gate_bias_for_testing.assign(cfg.n_routed_experts, 0.0f);
    for (const auto& [e, b] : o.gate_bias) {
      if (e >= cfg.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--gate-bias-for-testing: expert ", e, " is not in [0, ", cfg.n_routed_experts, ")"));
      }
      opts.gate_bias_for_testing[e] = b;
    }
    std::fprintf(stderr, "%s: TESTING: router logits biased for %zu experts\n", kName,
                 o.gate_bias.size());
  }
  opts.on_route = [metrics](int64_t layer, const core::GateResult& routing) {
    metrics->OnRoute(layer, routing);
  };
  if (!o.experts.empty()) {
    RemoteExpertOptions ro;
    ro.servers = o.experts;
    ro.placement = placement;
    ro.observer = metrics;
    ro.wire_dtype = WireDType(o);
    ro.shared_duty = o.shared;
    ro.per_assignment_replies = o.per_assignment;
    ro.local_compute = o.expert_weights;
    ro.deadline = std::chrono::milliseconds(o.expert_deadline_ms);
    DMOE_ASSIGN_OR_RETURN(RemoteExperts remote, MakeRemoteExperts(std::move(ro)));
    opts.experts = std::move(remote.backend);
    *control = remote.control;
    opts.load_routed_experts = false;
    opts.load_shared_experts = o.shared == place::SharedDuty::kRouter;
    opts.micro_batches = o.micro_batches;
  } else if (o.expert_weights != o.compute) {
    opts.experts = core::MakeCpuExpertBackend(o.expert_weights);
  }
  return core::Model::Load(o.model, std::move(opts));
}

absl::StatusOr<std::unique_ptr<PlacementController>> MakeController(const RouterOptions& o,
                                                                    const core::ModelConfig& cfg,
                                                                    LoadWindow* window,
                                                                    RemoteExpertControl* control,
                                                                    RouterMetrics* metrics) {
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<PlacementController> controller,
                        PlacementController::Create(cfg, window, control, o.control));
  controller->set_on_leave_refused(
      [metrics](const std::string&) { metrics->RecordLeaveRefused(); });
  controller->set_on_replacement([metrics, control](const v1::RebalanceResponse& r) {
    metrics->SetServers(control->servers());
    metrics->SetPlacement(control->placement());
    metrics->RecordReplacement(r.trigger(), r.bytes_moved(), absl::Seconds(r.switch_seconds()));
  });
  return controller;
}

std::unique_ptr<ReadinessMonitor> MakeReadiness(
    const core::ModelConfig& cfg, RemoteExpertControl* control, RouterMetrics* metrics,
    std::atomic<grpc::HealthCheckServiceInterface*>* health) {
  return std::make_unique<ReadinessMonitor>(
      cfg, control, nullptr,
      [metrics, health](const absl::Status& ready) {
        metrics->SetReady(ready.ok());
        if (grpc::HealthCheckServiceInterface* h = health->load()) {
          h->SetServingStatus(v1::RouterService::service_full_name(), ready.ok());
        }
      },
      ReadinessOptions());
}

std::unique_ptr<PlacementFollower> MakePlacementFollower(const RouterOptions& o,
                                                         const core::ModelConfig& cfg,
                                                         RemoteExpertControl* control,
                                                         RouterMetrics* metrics, int port) {
  return std::make_unique<PlacementFollower>(
      PlacementFollowerOptions{.controller_router = o.controller_router,
                               .advertise = AdvertiseAddress(o, port)},
      [control] { return control->placement().version(); },
      [&cfg, control, metrics](const v1::PlacementResponse& r) {
        return ApplyPlacement(cfg, *control, metrics, r.version(), r.placement_json(),
                              {r.server_addresses().begin(), r.server_addresses().end()});
      });
}

RouterServer::PlacementSetter PlacementSetter(const core::ModelConfig& cfg,
                                              RemoteExpertControl* control,
                                              RouterMetrics* metrics) {
  return [&cfg, control, metrics](const v1::SetPlacementRequest& r) {
    return ApplyPlacement(cfg, *control, metrics, r.version(), r.placement_json(),
                          {r.server_addresses().begin(), r.server_addresses().end()});
  };
}

std::string AdvertiseAddress(const RouterOptions& o, int port) {
  return common::AdvertiseAddress(o.advertise, o.host, port);
}

SchedulerOptions WithStepMetrics(SchedulerOptions options, RouterMetrics* metrics) {
  options.on_step = [metrics](absl::Duration d) { metrics->OnStep(d); };
  options.on_step_stages = [metrics](const core::StageTimes& stages, bool prefill) {
    metrics->OnStepStages(stages, prefill);
  };
  return options;
}

}  // namespace dmoe::router
