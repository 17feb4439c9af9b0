// Next-token sampling: greedy, temperature, top-k, top-p, seeded.
//
// temperature == 0 (or top_k == 1) is greedy: the highest logit, ties to the
// lower id. Otherwise logits are divided by the temperature, restricted to the
// top_k largest (0 = all), turned into probabilities (double precision), restricted
// to the smallest set whose mass reaches top_p (always at least one token), and
// one id is drawn with a generator seeded by `seed`: the same seed and logits
// give the same tokens on every machine.
#ifndef DMOE_CORE_SAMPLER_H_
#define DMOE_CORE_SAMPLER_H_

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace dmoe::core {

struct SamplingParams {
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;

  // InvalidArgument naming the parameter: temperature < 0 or not finite, top_k < 0,
  // top_p outside (0, 1].
  absl::Status Validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t Sample(std::span<const float> logits);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<int32_t> idx_;
  std::vector<double> prob_;
};

int32_t ArgMax(std::span<const float> logits);

}  // namespace dmoe::core

#endif  // DMOE_CORE_SAMPLER_H_
