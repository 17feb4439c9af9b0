#include "expert_service/expert_metrics.h"

#include <string>

#include "absl/status/status.h"

namespace dmoe::expert {
namespace {

// One batch's Compute: from a few tokens of a tiny expert (~50 us) to a
// 10 s straggler.
prometheus::Histogram::BucketBoundaries ComputeBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
          50e-3, 0.1,    0.25,   0.5,    1,    2.5,    5,    10};
}

// Tokens per batch, powers of two up to the default max_batch_tokens (8192)
// and beyond (one request may exceed it).
prometheus::Histogram::BucketBoundaries TokenBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double x = 1; x <= 32768; x *= 2) b.push_back(x);
  return b;
}

}  // namespace

ExpertMetrics::ExpertMetrics(prometheus::Registry& registry, const core::ModelConfig& cfg,
                             ExpertMetricsOptions options)
    : layers_(cfg.num_hidden_layers),
      experts_(cfg.n_routed_experts),
      per_expert_(options.per_expert),
      slot_tokens_(prometheus::BuildCounter()
                       .Name("moe_expert_slot_tokens_total")
                       .Help("Tokens computed by the slot (routed expert) of a "
                             "MoE layer (expert=\"all\" with "
                             "--expert-metrics=per-layer)")
                       .Register(registry)),
      compute_seconds_(prometheus::BuildHistogram()
                           .Name("moe_expert_compute_seconds")
                           .Help("Time of one backend Compute (a batch of one layer's "
                                 "requests)")
                           .Register(registry)
                           .Add({}, ComputeBuckets())),
      batch_tokens_(prometheus::BuildHistogram()
                        .Name("moe_expert_batch_tokens")
                        .Help("Tokens (rows) of one backend Compute")
                        .Register(registry)
                        .Add({}, TokenBuckets())),
      queue_depth_(prometheus::BuildGauge()
                       .Name("moe_expert_queue_depth")
                       .Help("Requests queued for compute, all streams")
                       .Register(registry)
                       .Add({})),
      requests_(prometheus::BuildCounter()
                    .Name("moe_expert_requests_total")
                    .Help("Requests answered by the compute worker, by status "
                          "code (RESOURCE_EXHAUSTED: refused, queue full)")
                    .Register(registry)),
      requests_ok_(requests_.Add({{"code", "OK"}})),
      resident_bytes_(prometheus::BuildGauge()
                          .Name("moe_expert_resident_weight_bytes")
                          .Help("Bytes of expert weights resident in the "
                                "backend (routed slots + shared experts), by device "
                                "and weight format")
                          .Register(registry)
                          .Add({{"device", options.device}, {"format", options.format}})),
      placement_version_(prometheus::BuildGauge()
                             .Name("moe_expert_placement_version")
                             .Help("Newest placement version the server holds")
                             .Register(registry)
                             .Add({})) {
  absl::MutexLock lock(&mu_);
  slot_counters_.assign(static_cast<size_t>(per_expert_ ? layers_ * experts_ : layers_), nullptr);
  if (!per_expert_) {
    for (int64_t l = 0; l < layers_; ++l) {
      if (cfg.IsMoeLayer(l)) SlotCounter(static_cast<int32_t>(l), 0);
    }
  }
}

prometheus::Counter& ExpertMetrics::SlotCounter(int32_t layer, int32_t expert) {
  const size_t i = static_cast<size_t>(per_expert_ ? layer * experts_ + expert : layer);
  if (slot_counters_[i] == nullptr) {
    slot_counters_[i] =
        &slot_tokens_.Add({{"layer", std::to_string(layer)},
                           {"expert", per_expert_ ? std::to_string(expert) : "all"}});
  }
  return *slot_counters_[i];
}

void ExpertMetrics::DeclareSlots(int32_t layer, std::span<const int32_t> experts) {
  if (layer < 0 || layer >= layers_) return;
  absl::MutexLock lock(&mu_);
  for (int32_t e : experts) {
    if (e >= 0 && e < experts_) SlotCounter(layer, e);
  }
}

void ExpertMetrics::SetResidentWeightBytes(size_t bytes) {
  resident_bytes_.Set(static_cast<double>(bytes));
}

void ExpertMetrics::SetPlacementVersion(uint64_t version) {
  placement_version_.Set(static_cast<double>(version));
}

void ExpertMetrics::OnBatch(
    int32_t layer, int64_t tokens, absl::Duration compute,
    std::span<const std::pair<internal::LayerExpert, uint64_t>> expert_tokens) {
  compute_seconds_.Observe(absl::ToDoubleSeconds(compute));
  batch_tokens_.Observe(static_cast<double>(tokens));
  absl::MutexLock lock(&mu_);
  for (const auto& [le, n] : expert_tokens) {
    if (le.layer < 0 || le.layer >= layers_ || le.expert < 0 || le.expert >= experts_) continue;
    SlotCounter(le.layer, le.expert).Increment(static_cast<double>(n));
  }
}

void ExpertMetrics::OnAnswered(absl::StatusCode code) {
  if (code == absl::StatusCode::kOk) {
    requests_ok_.Increment();
  } else {
    // Errors are rare: the family's own lookup is fine.
    requests_.Add({{"code", absl::StatusCodeToString(code)}}).Increment();
  }
}

void ExpertMetrics::OnQueueDepth(size_t queued) { queue_depth_.Set(static_cast<double>(queued)); }

}  // namespace dmoe::expert
