#include "core/layers.h"

#include <cmath>

#include "core/status.h"

namespace dmoe::core {

void RmsNorm(const float* x, const float* w, int64_t n, double eps, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

void RmsNormRows(const float* x, int64_t ldx, const float* w, int64_t rows, int64_t n, double eps,
                 float* out, int64_t ldo) {
#pragma omp parallel for if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) RmsNorm(x + r * ldx, w, n, eps, out + r * ldo);
}

absl::StatusOr<PackedLinear> LoadLinear(const Checkpoint& ckpt, const std::string& name, int64_t n,
                                        int64_t k, ComputeType type) {
  const int64_t shape[2] = {n, k};
  DMOE_ASSIGN_OR_RETURN(std::vector<float> w, ckpt.ReadF32(name, shape));
  ckpt.Release(name);
  return PackedLinear::Create(w.data(), n, k, type);
}

absl::StatusOr<std::vector<float>> LoadVector(const Checkpoint& ckpt, const std::string& name,
                                              int64_t n) {
  const int64_t shape[1] = {n};
  DMOE_ASSIGN_OR_RETURN(std::vector<float> v, ckpt.ReadF32(name, shape));
  ckpt.Release(name);
  return v;
}

}  // namespace dmoe::core
