// An expert server's Prometheus metrics (prefix moe_expert_), registered in a
// registry the caller owns (docs/metrics.md lists every one with its
// labels and the question it answers):
//
//   moe_expert_slot_tokens_total{layer,expert}  tokens computed per slot (expert="all"
//                                               in per-layer mode)
//   moe_expert_compute_seconds                  one backend Compute (a batch), histogram
//   moe_expert_batch_tokens                     tokens of a batch, histogram
//   moe_expert_queue_depth                      requests waiting for compute
//   moe_expert_requests_total{code}             requests answered by the compute worker, by
//                                               status code (RESOURCE_EXHAUSTED: queue full)
//   moe_expert_resident_weight_bytes{device}    expert weights held (routed + shared)
//   moe_expert_placement_version                newest placement version held
//
// Fed by the compute worker (internal::ComputeObserver) and the server
// (weights, placement version, slots). Cardinality: per-expert mode has one
// slot-token series per (MoE layer, expert) this server has held, made when
// the slot is declared or first computes; per-layer mode one per MoE layer.
//
// Thread safety: every method may be called from any thread.
#ifndef DMOE_EXPERT_SERVICE_EXPERT_METRICS_H_
#define DMOE_EXPERT_SERVICE_EXPERT_METRICS_H_

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "expert_service/internal/compute_worker.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace dmoe::expert {

struct ExpertMetricsOptions {
  // Slot-token counters per (layer, expert); false = per layer, expert="all".
  bool per_expert = true;
  // The device label of resident_weight_bytes ("cpu" for the CPU backend).
  std::string device = "cpu";
  // Its format label: the expert weights' format ("f32", "bf16", "int8").
  std::string format = "bf16";
};

class ExpertMetrics final : public internal::ComputeObserver {
 public:
  ExpertMetrics(prometheus::Registry& registry, const core::ModelConfig& cfg,
                ExpertMetricsOptions options = {});

  // Makes the slot-token series of `experts` in `layer` exist (at 0) before
  // they first compute.
  void DeclareSlots(int32_t layer, std::span<const int32_t> experts);
  void SetResidentWeightBytes(size_t bytes);
  void SetPlacementVersion(uint64_t version);

  // internal::ComputeObserver
  void OnBatch(int32_t layer, int64_t tokens, absl::Duration compute,
               std::span<const std::pair<internal::LayerExpert, uint64_t>> expert_tokens) override;
  void OnAnswered(absl::StatusCode code) override;
  void OnQueueDepth(size_t queued) override;

 private:
  prometheus::Counter& SlotCounter(int32_t layer, int32_t expert)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Const after construction.
  const int64_t layers_, experts_;
  const bool per_expert_;

  prometheus::Family<prometheus::Counter>& slot_tokens_;
  prometheus::Histogram& compute_seconds_;
  prometheus::Histogram& batch_tokens_;
  prometheus::Gauge& queue_depth_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Counter& requests_ok_;
  prometheus::Gauge& resident_bytes_;
  prometheus::Gauge& placement_version_;

  absl::Mutex mu_;
  // [layer * experts_ + e] (per-expert) or [layer]; null until made.
  std::vector<prometheus::Counter*> slot_counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe::expert

#endif  // DMOE_EXPERT_SERVICE_EXPERT_METRICS_H_
