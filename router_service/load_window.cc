#include "router_service/load_window.h"

#include <algorithm>
#include <cmath>

namespace dmoe::router {

LoadWindow::LoadWindow(int64_t layers, int64_t experts, int servers, LoadWindowOptions options)
    : options_(options),
      layers_(layers),
      experts_(experts),
      servers_(servers),
      num_buckets_(std::max<int64_t>(
          0,
          static_cast<int64_t>(std::ceil(absl::FDivDuration(options.window, options.bucket))) - 1)),
      decay_(std::pow(0.5, absl::FDivDuration(options.bucket, options.window))) {
  const size_t n = static_cast<size_t>(2 * layers * experts + layers + layers * servers);
  current_.assign(n, 0.0);
  history_.assign(n, 0.0);
  if (options_.mode == LoadWindowOptions::Mode::kSliding) {
    ring_.assign(static_cast<size_t>(num_buckets_), std::vector<double>(n, 0.0));
  }
}

void LoadWindow::Advance(absl::Time now) {
  const int64_t index = absl::ToUnixNanos(now) / absl::ToInt64Nanoseconds(options_.bucket);
  if (bucket_index_ < 0) bucket_index_ = index;
  if (index <= bucket_index_) return;
  const int64_t steps = index - bucket_index_;
  const size_t n = size();
  if (options_.mode == LoadWindowOptions::Mode::kEma) {
    // Weight decay^k for what is k buckets old.
    const double f = std::pow(decay_, static_cast<double>(steps));
    for (size_t i = 0; i < n; ++i) history_[i] = (history_[i] + current_[i]) * f;
  } else if (num_buckets_ > 0) {
    // The current bucket enters the ring; `steps - 1` empty buckets follow.
    for (int64_t k = 0; k < std::min(steps, num_buckets_); ++k) {
      std::vector<double>& slot = ring_[static_cast<size_t>(ring_head_)];
      for (size_t i = 0; i < n; ++i) history_[i] -= slot[i];
      if (k == 0) {
        slot = current_;
        for (size_t i = 0; i < n; ++i) history_[i] += slot[i];
      } else {
        std::fill(slot.begin(), slot.end(), 0.0);
      }
      ring_head_ = (ring_head_ + 1) % num_buckets_;
    }
    if (steps > num_buckets_) std::fill(history_.begin(), history_.end(), 0.0);
    // Guard against drift below zero from repeated subtraction.
    for (double& h : history_) h = std::max(h, 0.0);
  }
  std::fill(current_.begin(), current_.end(), 0.0);
  bucket_index_ = index;
}

void LoadWindow::AddRouting(int64_t layer, const core::GateResult& r, absl::Time now) {
  if (layer < 0 || layer >= layers_ || r.num_tokens == 0) return;
  absl::MutexLock lock(&mu_);
  Advance(now);
  double* assign = current_.data() + layer * experts_;
  double* prob = current_.data() + layers_ * experts_ + layer * experts_;
  for (int32_t e : r.experts) {
    if (e >= 0 && e < experts_) assign[e] += 1;
  }
  const int64_t E = static_cast<int64_t>(r.scores.size()) / std::max<int64_t>(r.num_tokens, 1);
  if (E == experts_) {
    for (int64_t t = 0; t < r.num_tokens; ++t) {
      const float* s = r.scores.data() + t * E;
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += s[e];
      if (sum <= 0) continue;
      for (int64_t e = 0; e < E; ++e) prob[e] += s[e] / sum;
    }
  }
  current_[2 * layers_ * experts_ + layer] += static_cast<double>(r.num_tokens);
}

void LoadWindow::AddServerTokens(int64_t layer, int server, int64_t tokens, absl::Time now) {
  if (layer < 0 || layer >= layers_ || server < 0 || server >= servers_) return;
  absl::MutexLock lock(&mu_);
  Advance(now);
  current_[2 * layers_ * experts_ + layers_ + layer * servers_ + server] +=
      static_cast<double>(tokens);
}

LoadSnapshot LoadWindow::Get(absl::Time now) const {
  LoadSnapshot s;
  s.layers = layers_;
  s.experts = experts_;
  s.servers = servers_;
  std::vector<double> all;
  {
    absl::MutexLock lock(&mu_);
    const_cast<LoadWindow*>(this)->Advance(now);
    all.resize(size());
    for (size_t i = 0; i < size(); ++i) all[i] = history_[i] + current_[i];
  }
  const size_t le = static_cast<size_t>(layers_ * experts_);
  s.assignments.assign(all.begin(), all.begin() + le);
  s.prob_sum.assign(all.begin() + le, all.begin() + 2 * le);
  s.tokens.assign(all.begin() + 2 * le, all.begin() + 2 * le + layers_);
  s.server_tokens.assign(all.begin() + 2 * le + layers_, all.end());
  return s;
}

void LoadWindow::Clear() {
  absl::MutexLock lock(&mu_);
  std::fill(current_.begin(), current_.end(), 0.0);
  std::fill(history_.begin(), history_.end(), 0.0);
  for (auto& r : ring_) std::fill(r.begin(), r.end(), 0.0);
}

LayerBalance ComputeBalance(const LoadSnapshot& s, int64_t layer, int64_t top_k,
                            const place::Placement& placement) {
  LayerBalance b;
  const int64_t N = s.experts;
  const int D = placement.num_servers();
  const double T = s.tokens[layer];
  if (T <= 0 || N == 0 || D == 0 || top_k <= 0) return b;
  std::vector<double> server_load(D, 0.0), server_f(D, 0.0), server_p(D, 0.0);
  std::vector<int> server_slots(D, 0);
  std::vector<double> slot_loads;
  int64_t total_slots = 0;
  for (int d = 0; d < D; ++d) total_slots += static_cast<int64_t>(placement.Slots(layer, d).size());
  double expert_stat = 0;
  for (int64_t e = 0; e < N; ++e) {
    const double f = s.Assignments(layer, e) / T;
    const double p = s.prob_sum[layer * N + e] / T;
    expert_stat += f * p;
  }
  b.expert_stat = expert_stat * static_cast<double>(N) / static_cast<double>(top_k);
  for (int d = 0; d < D; ++d) {
    for (int32_t e : placement.Slots(layer, d)) {
      const double r = static_cast<double>(placement.Replicas(layer, e).size());
      const double load = s.Assignments(layer, e) / r;
      server_load[d] += load;
      slot_loads.push_back(load);
      const double f = s.Assignments(layer, e) / T;
      server_f[d] += static_cast<double>(N) / static_cast<double>(top_k) * f *
                     (static_cast<double>(total_slots) / static_cast<double>(N)) / r;
      server_p[d] += s.prob_sum[layer * N + e] / T / r;
      ++server_slots[d];
    }
  }
  auto max_over_mean = [](const std::vector<double>& v) {
    if (v.empty()) return 0.0;
    double sum = 0, mx = 0;
    for (double x : v) {
      sum += x;
      mx = std::max(mx, x);
    }
    return sum > 0 ? mx / (sum / static_cast<double>(v.size())) : 0.0;
  };
  // Servers without slots in this layer (e.g. one that left) carry nothing.
  std::vector<double> serving;
  for (int d = 0; d < D; ++d) {
    if (server_slots[d] > 0) serving.push_back(server_load[d]);
  }
  b.server_max_over_mean = max_over_mean(serving);
  b.slot_max_over_mean = max_over_mean(slot_loads);
  for (int d = 0; d < D; ++d) {
    if (server_slots[d] > 0) b.server_stat += server_f[d] / server_slots[d] * server_p[d];
  }
  return b;
}

}  // namespace dmoe::router
