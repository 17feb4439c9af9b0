#include "core/layers.h"

#include <malloc.h>

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

namespace {
thread_local std::vector<float> load_buffers[4];
// Tensors above this size get a temporary of their own, freed right after
// packing, so that one huge tensor does not pin a huge buffer for the whole load.
constexpr size_t kMaxPooledFloats = size_t{64} << 20;
}  // namespace

float* LoadBuffer(int slot, size_t n) {
  std::vector<float>& b = load_buffers[slot & 3];
  if (b.size() < n) b.resize(n);
  return b.data();
}

// gperftools' tcmalloc, when the binary links it (the services do): weak, so
// that binaries on glibc malloc link too.
extern "C" void MallocExtension_ReleaseFreeMemory() __attribute__((weak));

void ReleaseLoadBuffers() {
  for (auto& b : load_buffers) std::vector<float>().swap(b);
  // Hand the freed heap pages (load buffers, packing temporaries) back to the
  // OS: glibc keeps them in its arenas, tcmalloc in its page heap.
  malloc_trim(0);
  if (MallocExtension_ReleaseFreeMemory != nullptr) MallocExtension_ReleaseFreeMemory();
}

absl::StatusOr<PackedLinear> LoadLinear(const Checkpoint& ckpt, const std::string& name, int64_t n,
                                        int64_t k, ComputeType type) {
  const int64_t shape[2] = {n, k};
  const size_t count = static_cast<size_t>(n) * k;
  std::vector<float> own;
  float* w = count > kMaxPooledFloats ? (own.resize(count), own.data()) : LoadBuffer(0, count);
  DMOE_RETURN_IF_ERROR(ckpt.ReadF32(name, shape, w));
  ckpt.Release(name);
  return PackedLinear::Create(w, n, k, type);
}

absl::StatusOr<std::vector<float>> LoadVector(const Checkpoint& ckpt, const std::string& name,
                                              int64_t n) {
  const int64_t shape[1] = {n};
  DMOE_ASSIGN_OR_RETURN(std::vector<float> v, ckpt.ReadF32(name, shape));
  ckpt.Release(name);
  return v;
}

}  // namespace dmoe::core
