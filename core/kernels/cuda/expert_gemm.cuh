// The expert projections of one batch as a list of independent GEMMs (one per
// FFN with rows), through cuBLAS with fp32 accumulation:
//   y[rows, out] = x[rows, in] · W[out, in]^T   (W row-major, HF nn.Linear).
// Two ways to issue them (CudaGemmMode in cuda_expert_backend.h):
//   kGrouped   - one cublasGemmGroupedBatchedEx (CUDA 12.5+) call for all of
//                them: one launch whatever the number of experts. Its type
//                combinations keep C in the input type (bf16 in -> bf16 out).
//   kPerExpert - one cublasGemmEx per problem, bf16 in -> fp32 out possible.
// Both read only the device; nothing here allocates or synchronises.
#ifndef DMOE_CORE_KERNELS_CUDA_EXPERT_GEMM_CUH_
#define DMOE_CORE_KERNELS_CUDA_EXPERT_GEMM_CUH_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace dmoe::core::cuda {

struct ExpertGemm {
  const void* w = nullptr;  // [out, in], dense
  const void* x = nullptr;  // [rows, ldx]
  void* y = nullptr;        // [rows, ldy]
  int32_t rows = 0, out = 0, in = 0;
  int32_t ldx = 0, ldy = 0;  // row strides in elements (>= in, >= out)
};

struct GemmTypes {
  cudaDataType_t in = CUDA_R_32F;   // w and x
  cudaDataType_t out = CUDA_R_32F;  // y
};

// Host scratch of the calls, grown only. Not thread-safe.
class ExpertGemmRunner {
 public:
  // The grouped call reads the problems' pointers from device memory laid out
  // as [w_0 .. w_{n-1}, x_0 .., y_0 ..]; this writes that image (3n entries).
  static size_t PointerArrayBytes(size_t n) { return 3 * n * sizeof(void*); }
  static void FillPointerArray(std::span<const ExpertGemm> problems, const void** image);

  // Enqueues the problems on the handle's stream (cublasSetStream is the
  // caller's). For grouped = true, `device_pointers` is the device copy of
  // FillPointerArray's image; it is unused otherwise.
  cublasStatus_t Run(cublasHandle_t handle, bool grouped, GemmTypes types,
                     std::span<const ExpertGemm> problems, const void* const* device_pointers);

 private:
  std::vector<cublasOperation_t> trans_a_, trans_b_;
  std::vector<int> m_, n_, k_, lda_, ldb_, ldc_, group_size_;
  std::vector<float> alpha_, beta_;
};

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_EXPERT_GEMM_CUH_
