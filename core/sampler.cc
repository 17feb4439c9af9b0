#include "core/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace dmoe::core {

absl::Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0 && top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  return absl::OkStatus();
}

int32_t ArgMax(std::span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (p_.temperature == 0.0 || p_.top_k == 1) return ArgMax(logits);
  const int64_t n = static_cast<int64_t>(logits.size());
  idx_.resize(n);
  std::iota(idx_.begin(), idx_.end(), 0);
  const int64_t k = (p_.top_k > 0 && p_.top_k < n) ? p_.top_k : n;
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(idx_.begin(), idx_.begin() + k, idx_.end(), by_logit);
  prob_.resize(k);
  const double mx = logits[idx_[0]];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    prob_[i] = std::exp((logits[idx_[i]] - mx) / p_.temperature);
    sum += prob_[i];
  }
  int64_t keep = k;
  if (p_.top_p < 1.0) {
    double cum = 0;
    for (int64_t i = 0; i < k; ++i) {
      cum += prob_[i] / sum;
      if (cum >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (int64_t i = 0; i < keep; ++i) kept += prob_[i];
  // 53 random bits -> uniform in [0, 1), independent of the standard library's
  // distribution implementations.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * kept;
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += prob_[i];
    if (u < acc) return idx_[i];
  }
  return idx_[keep - 1];
}

}  // namespace dmoe::core
