#include "core/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace dmoe::core {
namespace {

double YarnMscale(double factor, double mscale) {
  if (factor <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(factor) + 1.0;
}

// Dimension index at which `num_rotations` full turns happen over the original
// context length (docs/model.md: dim(b)).
double YarnCorrectionDim(double num_rotations, int64_t dim, double base, double max_pos) {
  return (dim * std::log(max_pos / (num_rotations * 2.0 * std::numbers::pi))) /
         (2.0 * std::log(base));
}

}  // namespace

std::vector<double> RopeInvFreq(const ModelConfig& cfg, int64_t dim) {
  const int64_t half = dim / 2;
  std::vector<double> inv(half);
  for (int64_t j = 0; j < half; ++j) {
    inv[j] = 1.0 / std::pow(cfg.rope_theta, static_cast<double>(2 * j) / dim);
  }
  const RopeScaling& rs = cfg.rope_scaling;
  if (rs.type == RopeScalingType::kYarn) {
    const double L = static_cast<double>(rs.original_max_position_embeddings);
    double lo = std::floor(YarnCorrectionDim(rs.beta_fast, dim, cfg.rope_theta, L));
    double hi = std::ceil(YarnCorrectionDim(rs.beta_slow, dim, cfg.rope_theta, L));
    lo = std::max(lo, 0.0);
    hi = std::min(hi, static_cast<double>(dim - 1));
    if (hi == lo) hi += 0.001;
    for (int64_t j = 0; j < half; ++j) {
      const double ramp = std::clamp((static_cast<double>(j) - lo) / (hi - lo), 0.0, 1.0);
      inv[j] = inv[j] / rs.factor * ramp + inv[j] * (1.0 - ramp);
    }
  }
  return inv;
}

double RopeCosSinScale(const ModelConfig& cfg) {
  const RopeScaling& rs = cfg.rope_scaling;
  if (rs.type != RopeScalingType::kYarn) return 1.0;
  return YarnMscale(rs.factor, rs.mscale) / YarnMscale(rs.factor, rs.mscale_all_dim);
}

RopeTable::RopeTable(const ModelConfig& cfg, int64_t dim, RopePairing pairing)
    : dim_(dim),
      pairing_(pairing),
      position_divisor_(cfg.rope_scaling.type == RopeScalingType::kLinear ? cfg.rope_scaling.factor
                                                                          : 1.0),
      scale_(RopeCosSinScale(cfg)),
      inv_freq_(RopeInvFreq(cfg, dim)) {}

void RopeTable::Reserve(int64_t n) {
  if (n <= capacity_) return;
  int64_t new_cap = std::max<int64_t>(n, std::max<int64_t>(64, capacity_ * 2));
  const int64_t half = dim_ / 2;
  cos_.resize(new_cap * half);
  sin_.resize(new_cap * half);
  for (int64_t p = capacity_; p < new_cap; ++p) {
    const double t = static_cast<double>(p) / position_divisor_;
    for (int64_t j = 0; j < half; ++j) {
      const double angle = t * inv_freq_[j];
      cos_[p * half + j] = static_cast<float>(std::cos(angle) * scale_);
      sin_[p * half + j] = static_cast<float>(std::sin(angle) * scale_);
    }
  }
  capacity_ = new_cap;
}

void RopeTable::Apply(float* x, int64_t position) const {
  const int64_t half = dim_ / 2;
  const float* c = cos_.data() + position * half;
  const float* s = sin_.data() + position * half;
  if (pairing_ == RopePairing::kInterleaved) {
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[2 * j], b = x[2 * j + 1];
      x[2 * j] = a * c[j] - b * s[j];
      x[2 * j + 1] = b * c[j] + a * s[j];
    }
  } else {
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[j], b = x[j + half];
      x[j] = a * c[j] - b * s[j];
      x[j + half] = b * c[j] + a * s[j];
    }
  }
}

}  // namespace dmoe::core
