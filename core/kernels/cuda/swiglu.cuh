// Fused SwiGLU over the gate|up GEMM output of the permuted rows:
//   h[r, j] = silu(gu[r, j]) * gu[r, inter + j],  silu(g) = g / (1 + exp(-g)),
// in float32 whatever the storage types. Rows are grouped by FFN and each group
// has its own width `inter` (routed experts and the shared FFN differ).
#ifndef DMOE_CORE_KERNELS_CUDA_SWIGLU_CUH_
#define DMOE_CORE_KERNELS_CUDA_SWIGLU_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmoe::core::cuda {

// gu: [rows, ld_gu] (gate columns [0, inter), up columns [inter, 2 inter));
// h: [rows, ld_h]. group_first_row: [groups + 1] device, ascending, [0] = 0,
// [groups] = rows; group_inter: [groups] device. In and Out are float or
// __nv_bfloat16 (Out rounds to nearest even).
template <typename In, typename Out>
cudaError_t LaunchSwiGlu(const In* gu, int64_t ld_gu, Out* h, int64_t ld_h, int32_t rows,
                         const int32_t* group_first_row, const int32_t* group_inter, int32_t groups,
                         cudaStream_t stream);

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_SWIGLU_CUH_
