#include <algorithm>

#include "core/kernels/cuda/convert.cuh"

namespace dmoe::core::cuda {
namespace {

__global__ void F32ToBF16Kernel(const float* in, __nv_bfloat16* out, int64_t n) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __float2bfloat16_rn(in[i]);
  }
}

}  // namespace

cudaError_t LaunchF32ToBF16(const float* in, __nv_bfloat16* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65536);
  F32ToBF16Kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(in, out, n);
  return cudaGetLastError();
}

}  // namespace dmoe::core::cuda
