// Recent load per (MoE layer, logical expert) and per (layer, expert server),
// as the router sees it: the gates' choices and probabilities, and the tokens
// it sent each server. The placement controller plans from it; the balance
// gauges are computed from it.
//
// Time is cut into buckets (1 s by default). Two ways to forget:
//   kSliding: the sum over the last `window` (whole buckets; the current,
//             partial bucket included);
//   kEma:     an exponential moving average with half-life `window`, updated
//             bucket by bucket (the current bucket counts with weight 1).
//
// Thread safety: every method may be called concurrently.
#ifndef DMOE_ROUTER_SERVICE_LOAD_WINDOW_H_
#define DMOE_ROUTER_SERVICE_LOAD_WINDOW_H_

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/gating.h"
#include "placement/placement.h"

namespace dmoe::router {

struct LoadWindowOptions {
  enum class Mode { kSliding, kEma };
  Mode mode = Mode::kSliding;
  absl::Duration window = absl::Seconds(60);  // sliding length, or EMA half-life
  absl::Duration bucket = absl::Seconds(1);
};

// What the window holds, for layers [0, layers) (dense layers stay zero).
struct LoadSnapshot {
  int64_t layers = 0, experts = 0, servers = 0;
  std::vector<double> assignments;    // [layer][expert]: tokens that chose the expert
  std::vector<double> prob_sum;       // [layer][expert]: Σ over tokens of its normalised score
  std::vector<double> tokens;         // [layer]: tokens routed
  std::vector<double> server_tokens;  // [layer][server]: tokens sent to the server

  double Assignments(int64_t l, int64_t e) const { return assignments[l * experts + e]; }
  double ServerTokens(int64_t l, int s) const { return server_tokens[l * servers + s]; }
};

// Balance statistics of one layer, from a snapshot and the placement it ran with.
struct LayerBalance {
  // Load of a server = Σ over its slots of (assignments of the slot's expert /
  // the expert's replica count); of a slot, its term of that sum.
  double server_max_over_mean = 0;  // 0 when the layer saw no tokens
  double slot_max_over_mean = 0;
  // The DeepSeek balance statistics, 1 when perfectly balanced. With
  // f_i = (tokens choosing expert i) / T and P_i = mean over the T tokens of
  // i's normalised gate probability (Σ_i P_i = 1):
  //   expert level  N/K · Σ_i f_i·P_i  (N experts, top-K);
  //   server level  Σ_d f'_d·P'_d with f'_d = the mean over d's slots of
  //                 (N/K)·f_i·(S/N)/r_i and P'_d = Σ over d's slots of P_i/r_i
  //                 (r_i replicas of expert i, S slots in all); without
  //                 replicas this is DeepSeek-V2's device-level statistic.
  double expert_stat = 0;
  double server_stat = 0;
};

LayerBalance ComputeBalance(const LoadSnapshot& s, int64_t layer, int64_t top_k,
                            const place::Placement& placement);

class LoadWindow {
 public:
  // `layers`: all model layers; `experts`: routed experts per MoE layer.
  LoadWindow(int64_t layers, int64_t experts, int servers, LoadWindowOptions options);

  void AddRouting(int64_t layer, const core::GateResult& routing, absl::Time now);
  void AddServerTokens(int64_t layer, int server, int64_t tokens, absl::Time now);
  LoadSnapshot Get(absl::Time now) const;
  // Forgets everything (e.g. after a re-placement, for server-level loads).
  void Clear();
  const LoadWindowOptions& options() const { return options_; }

 private:
  // Moves the current bucket into the history when `now` is past it.
  void Advance(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  size_t size() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return current_.size(); }

  const LoadWindowOptions options_;
  const int64_t layers_, experts_;
  const int servers_;
  const int64_t num_buckets_;  // sliding: buckets kept besides the current one
  const double decay_;         // EMA: weight of the history per bucket

  mutable absl::Mutex mu_;
  int64_t bucket_index_ ABSL_GUARDED_BY(mu_) = -1;  // of current_, in bucket units
  // Flat counters: assignments [L*E], prob_sum [L*E], tokens [L], server_tokens [L*N].
  std::vector<double> current_ ABSL_GUARDED_BY(mu_);
  std::vector<double> history_ ABSL_GUARDED_BY(mu_);  // sliding: sum of ring_; EMA: the average
  std::vector<std::vector<double>> ring_ ABSL_GUARDED_BY(mu_);  // sliding only
  int64_t ring_head_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_LOAD_WINDOW_H_
