#include <cuda_bf16.h>

#include <algorithm>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/kernels/cuda/ceilings.h"
#include "core/kernels/cuda/cuda_util.cuh"
#include "core/status.h"

namespace dmoe::core::cuda {
namespace {

__global__ void FillKernel(float* f32, __nv_bfloat16* b16, int64_t n, uint32_t seed) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = (h & 0xffff) / 32768.0f - 1.0f;  // [-1, 1)
    if (f32 != nullptr) f32[i] = v * 0.05f;
    if (b16 != nullptr) b16[i] = __float2bfloat16_rn(v * 0.05f);
  }
}

// Times `body` (which enqueues on `s`) with events: best of reps, seconds.
template <typename F>
absl::StatusOr<double> Best(cudaStream_t s, int reps, const F& body) {
  Event a, b;
  int device = 0;
  cudaGetDevice(&device);
  DMOE_RETURN_IF_ERROR(a.Create(device, true));
  DMOE_RETURN_IF_ERROR(b.Create(device, true));
  DMOE_RETURN_IF_ERROR(body());  // warm-up
  double best = 1e30;
  for (int r = 0; r < std::max(1, reps); ++r) {
    DMOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(a.get(), s), "event");
    DMOE_RETURN_IF_ERROR(body());
    DMOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(b.get(), s), "event");
    DMOE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(b.get()), "timed run");
    float ms = 0;
    DMOE_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, a.get(), b.get()), "event");
    best = std::min(best, ms * 1e-3);
  }
  return best;
}

}  // namespace

absl::StatusOr<double> DenseGemmSeconds(int device, bool bf16_in, bool bf16_out, int64_t m,
                                        int64_t n, int64_t k, int reps) {
  DeviceGuard g(device);
  Stream stream;
  CublasHandle blas;
  DMOE_RETURN_IF_ERROR(stream.Create(device));
  DMOE_RETURN_IF_ERROR(blas.Create(device));
  DMOE_RETURN_IF_ERROR(CublasStatus(cublasSetStream(blas.get(), stream.get()), "cublasSetStream"));
  const size_t in_bytes = bf16_in ? 2 : 4, out_bytes = bf16_out ? 2 : 4;
  DeviceBuffer w(device), x(device), y(device);
  DMOE_RETURN_IF_ERROR(w.Reserve(n * k * in_bytes));
  DMOE_RETURN_IF_ERROR(x.Reserve(m * k * in_bytes));
  DMOE_RETURN_IF_ERROR(y.Reserve(m * n * out_bytes));
  for (auto [buf, count, seed] : {std::tuple{&w, n * k, 1u}, std::tuple{&x, m * k, 2u}}) {
    FillKernel<<<1024, 256, 0, stream.get()>>>(bf16_in ? nullptr : buf->get<float>(),
                                               bf16_in ? buf->get<__nv_bfloat16>() : nullptr, count,
                                               seed);
  }
  DMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "fill");
  const cudaDataType_t in_t = bf16_in ? CUDA_R_16BF : CUDA_R_32F;
  const cudaDataType_t out_t = bf16_out ? CUDA_R_16BF : CUDA_R_32F;
  const float one = 1.0f, zero = 0.0f;
  return Best(stream.get(), reps, [&]() -> absl::Status {
    return CublasStatus(
        cublasGemmEx(blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                     static_cast<int>(k), &one, w.get(), in_t, static_cast<int>(k), x.get(), in_t,
                     static_cast<int>(k), &zero, y.get(), out_t, static_cast<int>(n),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        absl::StrCat("dense GEMM ", m, "x", n, "x", k));
  });
}

absl::StatusOr<double> DeviceCopyGBs(int device, size_t bytes, int reps) {
  DeviceGuard g(device);
  Stream stream;
  DMOE_RETURN_IF_ERROR(stream.Create(device));
  DeviceBuffer a(device), b(device);
  DMOE_RETURN_IF_ERROR(a.Reserve(bytes));
  DMOE_RETURN_IF_ERROR(b.Reserve(bytes));
  DMOE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(a.get(), 1, bytes, stream.get()), "memset");
  DMOE_ASSIGN_OR_RETURN(
      const double s, Best(stream.get(), reps, [&]() -> absl::Status {
        DMOE_CUDA_RETURN_IF_ERROR(
            cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream.get()),
            "device-to-device copy");
        return absl::OkStatus();
      }));
  return 2.0 * bytes / s / 1e9;
}

}  // namespace dmoe::core::cuda
