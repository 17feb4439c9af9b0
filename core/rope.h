// Rotary position embeddings with the scalings DeepSeek checkpoints use.
//
// RopeTable precomputes cos/sin per (position, frequency) for a rotary dimension
// `dim` from a ModelConfig: plain RoPE (theta^(-2j/dim)), linear scaling
// (positions divided by factor) or YaRN (frequency ramp between beta_fast and
// beta_slow, cos/sin multiplied by yarn_mscale(factor, mscale) /
// yarn_mscale(factor, mscale_all_dim)) exactly as in docs/model.md. Tables are
// computed in double and stored as float; they grow on demand.
//
// Two pairings of dimensions:
//   kInterleaved (MLA q_pe / k_pe): dims (2j, 2j+1) form pair j;
//   kHalves (llama style, DeepSeekMoE MHA): dims (j, j + dim/2) form pair j.
// Both rotate pair j by angle position * inv_freq[j].
//
// Thread safety: Reserve() must not race with Apply(); Apply is const.
#ifndef DMOE_CORE_ROPE_H_
#define DMOE_CORE_ROPE_H_

#include <cstdint>
#include <vector>

#include "core/config.h"

namespace dmoe::core {

enum class RopePairing { kInterleaved, kHalves };

// The per-pair inverse frequencies [dim/2] after scaling, and the cos/sin
// multiplier, as docs/model.md defines them (double precision).
std::vector<double> RopeInvFreq(const ModelConfig& cfg, int64_t dim);
double RopeCosSinScale(const ModelConfig& cfg);

class RopeTable {
 public:
  RopeTable(const ModelConfig& cfg, int64_t dim, RopePairing pairing);
  // Makes positions [0, n) available.
  void Reserve(int64_t n);
  int64_t capacity() const { return capacity_; }
  // Rotates `x` (dim floats) in place for `position` (< capacity()).
  void Apply(float* x, int64_t position) const;
  int64_t dim() const { return dim_; }

 private:
  int64_t dim_;
  RopePairing pairing_;
  double position_divisor_;
  double scale_;
  std::vector<double> inv_freq_;
  int64_t capacity_ = 0;
  std::vector<float> cos_, sin_;  // [capacity, dim/2]
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_ROPE_H_
