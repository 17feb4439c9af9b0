// Small building blocks shared by the model's layers: RMSNorm, loading packed
// linears and vectors from a checkpoint, and the batch's token layout.
#ifndef DMOE_CORE_LAYERS_H_
#define DMOE_CORE_LAYERS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/kernels/cpu/linear.h"
#include "core/safetensors.h"

namespace dmoe::core {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]; the mean in double. out may alias x.
void RmsNorm(const float* x, const float* w, int64_t n, double eps, float* out);
// RmsNorm on each of `rows` rows of length n, row strides ldx / ldo.
void RmsNormRows(const float* x, int64_t ldx, const float* w, int64_t rows, int64_t n, double eps,
                 float* out, int64_t ldo);

// A grow-only float buffer reused by every tensor a thread loads, so that loading
// does not fault in fresh pages for each temporary copy (costly on VMs).
// `slot` selects one of a few independent buffers (e.g. gate/up/down of an FFN).
float* LoadBuffer(int slot, size_t n);
// Frees this thread's load buffers (call when loading is done) and returns free
// heap memory to the OS (glibc arenas; tcmalloc's page heap when linked).
void ReleaseLoadBuffers();

// Loads `name` ([n, k]) as a PackedLinear and drops the file pages afterwards.
absl::StatusOr<PackedLinear> LoadLinear(const Checkpoint& ckpt, const std::string& name, int64_t n,
                                        int64_t k, ComputeType type);
absl::StatusOr<std::vector<float>> LoadVector(const Checkpoint& ckpt, const std::string& name,
                                              int64_t n);

// Where each token of a batch sits: its sequence (KV cache id) and position.
struct TokenLayout {
  int64_t num_tokens = 0;
  std::vector<int32_t> seq;       // [num_tokens]
  std::vector<int64_t> position;  // [num_tokens]
};

// Grow-only float buffer for per-step scratch space (no allocation once warm).
class Scratch {
 public:
  float* Get(size_t n) {
    if (buf_.size() < n) buf_.resize(n);
    return buf_.data();
  }

 private:
  std::vector<float> buf_;
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_LAYERS_H_
