// The start-up pieces of the dmoe-router binary (router_service/main.cc),
// from RouterOptions (router_options.h): the model's config, the starting
// placement (fetched from the controller's router with --controller-router),
// the model with its expert backend, the placement controller with its
// metrics wiring, and the readiness monitor.
#ifndef DMOE_ROUTER_SERVICE_ROUTER_STARTUP_H_
#define DMOE_ROUTER_SERVICE_ROUTER_STARTUP_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/wire.h"
#include "core/config.h"
#include "core/model.h"
#include "grpcpp/health_check_service_interface.h"
#include "placement/placement.h"
#include "router_service/controller.h"
#include "router_service/load_window.h"
#include "router_service/placement_follower.h"
#include "router_service/readiness.h"
#include "router_service/remote_expert_backend.h"
#include "router_service/router_metrics.h"
#include "router_service/router_options.h"
#include "router_service/router_server.h"

namespace dmoe::router {

// config.json of --model; NotFound "--model: 'DIR' is not a directory".
absl::StatusOr<core::ModelConfig> ReadModelConfig(const RouterOptions& o);

// The starting placement. With --controller-router: the controller router's
// (FetchPlacement, placement_follower.h), whose expert servers then go into
// o->experts. Else --placement, or contiguous over the expert servers; in
// process (no --experts) the router is the one "server" that holds every
// expert (for the balance metrics); an empty placement for a model without
// routed experts.
absl::StatusOr<place::Placement> StartPlacement(RouterOptions* o, const core::ModelConfig& cfg);

// The activations' wire type for --wire-dtype (auto: f32 with --dtype f32,
// else bf16).
common::WireDType WireDType(const RouterOptions& o);

// Loads the model; with --experts its experts are remote (RemoteExpertBackend)
// and *control is set to their control. `metrics` (not owned) is told of
// every routing and, with expert servers, of the traffic to them.
// InvalidArgument for a --gate-bias-for-testing expert out of range.
absl::StatusOr<std::unique_ptr<core::Model>> LoadModel(const RouterOptions& o,
                                                       const place::Placement& placement,
                                                       RouterMetrics* metrics,
                                                       RemoteExpertControl** control);

// The placement controller (--controller), its re-placements and refused
// leaves reported to `metrics`. Not started.
absl::StatusOr<std::unique_ptr<PlacementController>> MakeController(const RouterOptions& o,
                                                                    const core::ModelConfig& cfg,
                                                                    LoadWindow* window,
                                                                    RemoteExpertControl* control,
                                                                    RouterMetrics* metrics);

// Readiness (readiness.h) of a router with remote experts: ready only while
// every routed expert has a live server. It shows in moe_router_ready and in
// the gRPC health of "dmoe.v1.RouterService" once *health is set (the
// readiness probe; "" stays SERVING: the liveness probe). Not started.
std::unique_ptr<ReadinessMonitor> MakeReadiness(
    const core::ModelConfig& cfg, RemoteExpertControl* control, RouterMetrics* metrics,
    std::atomic<grpc::HealthCheckServiceInterface*>* health);

// A follower of --controller-router's placement (not started): registers as
// AdvertiseAddress(o, port) and applies newer placements (ApplyPlacement).
std::unique_ptr<PlacementFollower> MakePlacementFollower(const RouterOptions& o,
                                                         const core::ModelConfig& cfg,
                                                         RemoteExpertControl* control,
                                                         RouterMetrics* metrics, int port);
// How a placement pushed by the controller's router (SetPlacement) is applied.
RouterServer::PlacementSetter PlacementSetter(const core::ModelConfig& cfg,
                                              RemoteExpertControl* control, RouterMetrics* metrics);

// --advertise, or --host (the hostname when it is a wildcard) and `port`.
std::string AdvertiseAddress(const RouterOptions& o, int port);

// `options` with its step callbacks feeding `metrics` (moe_router_step_seconds,
// moe_router_step_stage_seconds_total); `metrics` must outlive the scheduler.
SchedulerOptions WithStepMetrics(SchedulerOptions options, RouterMetrics* metrics);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_ROUTER_STARTUP_H_
