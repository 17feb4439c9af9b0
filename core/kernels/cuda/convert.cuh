// Element type conversion on the device (weights at load time).
#ifndef DMOE_CORE_KERNELS_CUDA_CONVERT_CUH_
#define DMOE_CORE_KERNELS_CUDA_CONVERT_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmoe::core::cuda {

// out[i] = bf16(in[i]) for i in [0, n), round to nearest even (NaN stays NaN),
// the rounding of core/dtype.h's F32ToBF16 and of the CPU backend's oneDNN
// path.
cudaError_t LaunchF32ToBF16(const float* in, __nv_bfloat16* out, int64_t n, cudaStream_t stream);

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_CONVERT_CUH_
