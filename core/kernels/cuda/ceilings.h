// What a CUDA device can do, measured, for benchmarks to state ratios against
// (bench/moe_layer_bench.cc --backend=cuda). Plain C++; CUDA only in the .cu.
#ifndef DMOE_CORE_KERNELS_CUDA_CEILINGS_H_
#define DMOE_CORE_KERNELS_CUDA_CEILINGS_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"

namespace dmoe::core::cuda {

// Seconds of one dense GEMM y[m, n] = x[m, k] · W[n, k]^T through cublasGemmEx
// with fp32 accumulation: bf16 or fp32 inputs (`bf16_in`), bf16 or fp32
// output (`bf16_out`), the types the expert backend uses. The best of `reps`
// timed calls (CUDA events) after one warm-up. Random data.
absl::StatusOr<double> DenseGemmSeconds(int device, bool bf16_in, bool bf16_out, int64_t m,
                                        int64_t n, int64_t k, int reps);

// Device-to-device copy bandwidth on `device` (cudaMemcpyAsync of `bytes`),
// counted as bytes read + bytes written per second, in GB/s; best of `reps`.
absl::StatusOr<double> DeviceCopyGBs(int device, size_t bytes, int reps);

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_CEILINGS_H_
