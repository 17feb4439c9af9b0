// Dense linear layers on the CPU, with weights packed once.
//
// PackedLinear computes y[m, n] = x[m, k] · W[n, k]^T (the layout of a Hugging
// Face `nn.Linear.weight`). At Create the row-major float weights are converted
// to the compute type and packed once for the kernel that will run them, so no
// call ever repacks.
//
// Batch invariance: the bits of a row of y depend only on that row of x, never
// on M, on the other rows, on the thread count or on the caller's strides:
// every layer runs dmoe's own kernels (gemm.h), which have that property by
// construction and give the same bits at every ISA level - generic, AVX2,
// AVX-512 and, for bf16, AVX512_BF16's vdpbf16ps (core/isa.h caps the level;
// the generic level's f32 products round separately). Compute types:
//   kF32  - f32 weights and activations (the exact mode of docs/model.md);
//   kBF16 - bf16 weights, activations rounded to bf16 on the way in, f32
//           accumulation and f32 output (uses AVX512_BF16 where the CPU has
//           it).
//   kInt8 - int8 weights quantised at Create, symmetric per output channel
//           (gemm.h PackInt8: half the bytes of bf16), activations rounded
//           to bf16, f32 accumulation, each output times its channel's scale.
//           Create fails with InvalidArgument on a non-finite weight.
//
// Thread safety: Forward is const and safe to call from several threads at
// once; it parallelises internally over the process's single OpenMP pool (call
// it from outside a parallel region to use every thread).
#ifndef DMOE_CORE_KERNELS_CPU_LINEAR_H_
#define DMOE_CORE_KERNELS_CPU_LINEAR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace dmoe::core {

enum class ComputeType { kF32, kBF16, kInt8 };

class PackedLinear {
 public:
  PackedLinear();
  ~PackedLinear();
  PackedLinear(PackedLinear&&) noexcept;
  PackedLinear& operator=(PackedLinear&&) noexcept;

  // `w` is [n, k] row-major float32; it is copied, the caller keeps ownership.
  static absl::StatusOr<PackedLinear> Create(const float* w, int64_t n, int64_t k,
                                             ComputeType type);

  // y[m, n] = x[m, k] · W^T. `x` and `y` are row-major float32 with the given
  // row strides (in elements; 0 means dense: k and n). m == 0 is a no-op.
  void Forward(const float* x, int64_t m, float* y, int64_t ldx = 0, int64_t ldy = 0) const;

  // The kernel that runs this layer: "dmoe-avx2", "dmoe-avx512",
  // "dmoe-generic", "dmoe-avx512-bf16" (bf16 layers on AVX512_BF16) or
  // "onednn" (only after AllowBatchVariantOneDnnForBenchmarks).
  std::string KernelName() const;
  // False only for layers created after AllowBatchVariantOneDnnForBenchmarks.
  bool batch_invariant() const;

  int64_t n() const;
  int64_t k() const;
  ComputeType type() const;
  // Bytes of packed weights held.
  size_t weight_bytes() const;
  bool empty() const { return impl_ == nullptr; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Benchmarks only: layers created while `allow` is true run oneDNN's matmul
// wherever it exists, even where it is not batch-invariant (AVX2 and AVX-512
// without BF16: gemm:jit), to measure what invariance costs.
void AllowBatchVariantOneDnnForBenchmarks(bool allow);

// Sets the size of the process's one compute thread pool (OpenMP, shared with
// oneDNN). n <= 0 leaves the default (all cores).
void SetComputeThreads(int n);
int ComputeThreads();

}  // namespace dmoe::core

#endif  // DMOE_CORE_KERNELS_CPU_LINEAR_H_
