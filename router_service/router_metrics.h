// The router's Prometheus metrics (prefix moe_router_), registered in a
// registry the caller owns (docs/metrics.md lists every one with its
// labels and the question it answers).
//
// Fed by the model's on_route hook (OnRoute: the gates' choices per MoE layer)
// and by the remote expert backend as its RemoteExpertObserver (traffic and
// round trips per server, failovers); it also writes these into the router's
// one LoadWindow (AddRouting, AddServerTokens), which the placement
// controller reads too. Refresh() computes the gauges that are functions of
// state: the balance of each layer and overall from that window with the
// current placement (ComputeBalance), and the scheduler's load. The binary
// calls it on every scrape (common::RefreshingCollectable).
//
//   moe_router_routed_tokens_total{layer,expert}   token->expert assignments (expert="all"
//                                                  in per-layer mode)
//   moe_router_server_tokens_total{server}         tokens sent (re-sends included)
//   moe_router_server_sent_bytes_total{server} / moe_router_server_received_bytes_total{server}
//   moe_router_server_round_trip_seconds{server}   histogram, per request
//   moe_router_server_failovers_total{server,code} requests the server failed
//   moe_router_resent_tokens_total / moe_router_stranded_tokens_total
//   moe_router_server_info{server,address}         1
//   moe_router_layer_{server,slot}_max_over_mean{layer},
//   moe_router_layer_{expert,server}_balance_stat{layer} moe_router_server_max_over_mean,
//   moe_router_server_load{server}   over all MoE layers moe_router_placement_version,
//   moe_router_replacements_total{trigger}, moe_router_replacement_bytes_moved_total,
//   moe_router_replacement_switch_seconds moe_router_leaves_refused_total                 scale-in
//   leaves the controller refused moe_router_ready                                1 when every
//   routed expert has a live server moe_router_active_sequences, moe_router_queued_requests,
//   moe_router_kv_cache_{free,budget}_bytes, moe_router_kv_cache_blocks{state=used|cached|total},
//   moe_router_kv_cache_bytes_per_token, moe_router_kv_cache_saturated_values_total,
//   moe_router_prefix_cache_{queried,hit}_tokens_total,
//   moe_router_prefix_cache_evicted_blocks_total, moe_router_preemptions_total,
//   moe_router_recomputed_tokens_total, moe_router_steps_total, moe_router_failed_steps_total,
//   moe_router_step_tokens_total moe_router_step_seconds (histogram: one model step, e.g. through a
//   re-placement) moe_router_step_stage_seconds_total{stage,phase},
//   moe_router_phase_steps_total{phase}   where steps spend their time
//
// Cardinality: per-expert mode has (MoE layers x routed experts) routed-token
// series (DeepSeek-V3: 58 x 256 = 14,848), created up front; per-layer mode
// one per MoE layer. Everything else is per layer, per server or fixed.
//
// Thread safety: every method may be called from any thread. OnRoute and the
// observer methods are meant for the scheduler thread (quick, no allocation
// in the steady state); Refresh, SetPlacement, SetLoadSource and
// RecordReplacement, SetServers may run concurrently with them.
#ifndef DMOE_ROUTER_SERVICE_ROUTER_METRICS_H_
#define DMOE_ROUTER_SERVICE_ROUTER_METRICS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "core/gating.h"
#include "core/stage_times.h"
#include "placement/placement.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "router_service/load_window.h"
#include "router_service/remote_expert_backend.h"
#include "router_service/scheduler.h"

namespace dmoe::router {

struct RouterMetricsOptions {
  // Routed-token counters per (layer, expert); false = per layer, expert="all".
  bool per_expert = true;
  // Expert server addresses, index = server index (moe_router_server_info).
  std::vector<std::string> servers;
};

class RouterMetrics final : public RemoteExpertObserver {
 public:
  // `cfg`: the model (layers, experts, top-k). `placement`: the one the
  // router starts with (its version is exported; with no expert servers,
  // Placement::Contiguous(cfg, 1): the router is the only "server").
  // `window`: not owned, may be null (no balance gauges then); must outlive
  // this object. Its server count should cover the placement's servers.
  RouterMetrics(prometheus::Registry& registry, const core::ModelConfig& cfg,
                const place::Placement& placement, LoadWindow* window,
                RouterMetricsOptions options);

  // core::ModelOptions::on_route: one MoE layer's routing of a micro-batch.
  void OnRoute(int64_t layer, const core::GateResult& routing);

  // RemoteExpertObserver.
  void OnSend(int32_t layer, int server, const place::ServerShare& share,
              size_t wire_bytes) override;
  void OnReply(int32_t layer, int server, int64_t tokens, size_t wire_bytes,
               absl::Duration round_trip) override;
  void OnFailover(int32_t layer, int server, absl::StatusCode code, int64_t resent,
                  int64_t stranded) override;

  // The placement the router now plans with: balance is computed against it
  // and moe_router_placement_version is set to its version.
  void SetPlacement(const place::Placement& placement);
  // The expert servers now are `addresses` (index = server index):
  // moe_router_server_info is replaced; traffic series of servers beyond the
  // old list appear with their first request.
  void SetServers(const std::vector<std::string>& addresses);
  // A re-placement was applied: `trigger` names why (bounded set, e.g.
  // "balance", "operator", "membership"), `bytes_moved` the expert weights
  // loaded onto servers, `switch_time` from the decision to the switch.
  void RecordReplacement(const std::string& trigger, uint64_t bytes_moved,
                         absl::Duration switch_time);
  // The controller refused a server's leave (the others cannot hold its experts).
  void RecordLeaveRefused() { leaves_refused_.Increment(); }
  // Readiness (router_service/readiness.h): can the model run a token now.
  void SetReady(bool ready) { ready_.Set(ready ? 1 : 0); }
  // Where the scheduler gauges come from (called by Refresh); set once the
  // scheduler exists. Null = none.
  void SetLoadSource(std::function<SchedulerLoad()> source);
  // One scheduler step (SchedulerOptions::on_step).
  void OnStep(absl::Duration duration) { step_seconds_.Observe(absl::ToDoubleSeconds(duration)); }
  // Where one step's time went (SchedulerOptions::on_step_stages):
  // moe_router_step_stage_seconds_total{stage, phase} and
  // moe_router_phase_steps_total{phase}; phase "prefill" when the step carried
  // prompt tokens (with or without decodes), else "decode".
  void OnStepStages(const core::StageTimes& stages, bool prefill);

  // Recomputes the balance gauges (window at `now`, current placement) and
  // the scheduler gauges/counters.
  void Refresh(absl::Time now = absl::Now());

 private:
  // Const after construction.
  const int64_t layers_, experts_, top_k_;
  const std::vector<int64_t> moe_layers_;  // MoE layer indices, ascending
  const bool per_expert_;
  const int num_servers_;  // options.servers: traffic series made up front (more on demand)
  LoadWindow* const window_;

  prometheus::Family<prometheus::Counter>& routed_family_;
  prometheus::Family<prometheus::Counter>& server_tokens_family_;
  prometheus::Family<prometheus::Counter>& sent_bytes_family_;
  prometheus::Family<prometheus::Counter>& received_bytes_family_;
  prometheus::Family<prometheus::Histogram>& round_trip_family_;
  prometheus::Family<prometheus::Counter>& failovers_;
  prometheus::Counter& resent_tokens_;
  prometheus::Counter& stranded_tokens_;
  prometheus::Family<prometheus::Gauge>& server_info_;
  prometheus::Family<prometheus::Gauge>& layer_server_mom_;
  prometheus::Family<prometheus::Gauge>& layer_slot_mom_;
  prometheus::Family<prometheus::Gauge>& layer_expert_stat_;
  prometheus::Family<prometheus::Gauge>& layer_server_stat_;
  prometheus::Gauge& server_mom_;
  prometheus::Family<prometheus::Gauge>& server_load_;
  prometheus::Gauge& placement_version_;
  prometheus::Family<prometheus::Counter>& replacements_;
  prometheus::Counter& replacement_bytes_;
  prometheus::Histogram& replacement_switch_;
  prometheus::Counter& leaves_refused_;
  prometheus::Gauge& ready_;
  prometheus::Histogram& step_seconds_;
  prometheus::Gauge& active_sequences_;
  prometheus::Gauge& queued_requests_;
  prometheus::Gauge& kv_free_;
  prometheus::Gauge& kv_blocks_used_;
  prometheus::Gauge& kv_blocks_total_;
  prometheus::Gauge& kv_blocks_cached_;
  prometheus::Gauge& kv_bytes_per_token_;
  prometheus::Counter& prefix_queried_;
  prometheus::Counter& prefix_hit_;
  prometheus::Counter& prefix_evicted_;
  prometheus::Counter& kv_saturated_;
  prometheus::Counter& preemptions_;
  prometheus::Counter& recomputed_tokens_;
  prometheus::Gauge& kv_budget_;
  prometheus::Counter& steps_;
  prometheus::Counter& failed_steps_;
  prometheus::Counter& step_tokens_;
  // [phase][stage] (phase 0 = decode, 1 = prefill) and steps per phase.
  std::vector<std::vector<prometheus::Counter*>> stage_seconds_;
  std::vector<prometheus::Counter*> phase_steps_;

  // Per server (index), the series of its traffic.
  struct ServerSeries {
    prometheus::Counter* tokens = nullptr;
    prometheus::Counter* sent_bytes = nullptr;
    prometheus::Counter* received_bytes = nullptr;
    prometheus::Histogram* round_trip = nullptr;
  };
  ServerSeries& Server(int server) ABSL_EXCLUSIVE_LOCKS_REQUIRED(traffic_mu_);

  // Routed-token counters: [layer * experts_ + e] (per-expert) or [layer]
  // (per-layer); null for dense layers. Filled in the constructor.
  std::vector<prometheus::Counter*> routed_;

  absl::Mutex traffic_mu_;  // OnRoute and the observer methods
  std::vector<ServerSeries> servers_ ABSL_GUARDED_BY(traffic_mu_);
  std::vector<uint64_t> route_counts_ ABSL_GUARDED_BY(traffic_mu_);  // [experts_] scratch

  absl::Mutex info_mu_;
  std::vector<prometheus::Gauge*> info_ ABSL_GUARDED_BY(info_mu_);  // [server]

  absl::Mutex state_mu_;  // Refresh, SetPlacement, SetLoadSource
  place::Placement placement_ ABSL_GUARDED_BY(state_mu_);
  std::function<SchedulerLoad()> load_source_ ABSL_GUARDED_BY(state_mu_);
  SchedulerLoad last_load_ ABSL_GUARDED_BY(state_mu_);  // counters already exported
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_ROUTER_METRICS_H_
